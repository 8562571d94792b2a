//! `geek bench http`: a load test of an OpenAI-compatible completions server (`geek serve`,
//! llama-server): a fixed number of requests at a fixed concurrency, every 503 retried after
//! its `Retry-After`, latency percentiles, throughput and the server's peak memory.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;

/// `geek bench http`
#[derive(Debug, Args)]
pub struct BenchHttpArgs {
    /// The server's base URL.
    #[arg(long)]
    pub url: String,
    /// Requests in all.
    #[arg(long, default_value_t = 200)]
    pub requests: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    /// Bearer key.
    #[arg(long)]
    pub api_key: Option<String>,
    /// The server's process id, to report its peak resident memory (Linux).
    #[arg(long)]
    pub pid: Option<u32>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// What the load test measured.
#[derive(Debug, Serialize)]
pub struct HttpReport {
    /// Requests answered in full.
    pub answered: usize,
    /// Requests that failed for good (not 503).
    pub failed: usize,
    /// 503 answers (each retried).
    pub busy_retries: usize,
    /// Wall time of the whole test.
    pub seconds: f64,
    /// Answered requests per second.
    pub requests_per_second: f64,
    /// Generated tokens per second (from the answers' usage).
    pub tokens_per_second: f64,
    /// Median latency of an answered request (first try to answer), seconds.
    pub p50: f64,
    /// 99th percentile latency, seconds.
    pub p99: f64,
    /// Server's peak resident memory before and after, MiB (with `--pid`).
    pub server_peak_rss_mib: Option<(f64, f64)>,
}

/// One request's outcome: latency, generated tokens, 503s seen; or the failure.
type Outcome = std::result::Result<(f64, usize, usize), String>;

pub fn run(args: BenchHttpArgs) -> Result<()> {
    anyhow::ensure!(args.concurrency >= 1, "--concurrency must be at least 1");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let rss_before = args.pid.and_then(peak_rss_mib);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()
        .context("HTTP client")?;
    let started = Instant::now();
    let outcomes: Vec<Outcome> = runtime.block_on(async {
        use futures::StreamExt;
        futures::stream::iter(0..args.requests)
            .map(|i| one_request(&client, &args, i))
            .buffer_unordered(args.concurrency)
            .collect()
            .await
    });
    let seconds = started.elapsed().as_secs_f64();
    let report = summarise(
        &outcomes,
        seconds,
        rss_before.zip(args.pid.and_then(peak_rss_mib)),
    );
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{} answered, {} failed, {} busy (503, retried) in {:.1} s: {:.2} requests/s, {:.1} generated tokens/s; latency p50 {:.2} s, p99 {:.2} s{}",
            report.answered,
            report.failed,
            report.busy_retries,
            report.seconds,
            report.requests_per_second,
            report.tokens_per_second,
            report.p50,
            report.p99,
            report
                .server_peak_rss_mib
                .map_or(String::new(), |(a, b)| format!("; server peak RSS {a:.0} → {b:.0} MiB"))
        );
    }
    for failure in outcomes.iter().filter_map(|o| o.as_ref().err()).take(3) {
        eprintln!("failed: {failure}");
    }
    Ok(())
}

async fn one_request(client: &reqwest::Client, args: &BenchHttpArgs, i: usize) -> Outcome {
    let body = serde_json::json!({
        "prompt": format!("Question {i}: name a country that starts with the letter {}. Answer:",
                          (b'A' + (i % 26) as u8) as char),
        "max_tokens": args.max_tokens,
        "temperature": 0,
    });
    let url = format!("{}/v1/completions", args.url.trim_end_matches('/'));
    let started = Instant::now();
    let mut busy = 0;
    loop {
        let mut request = client.post(&url).json(&body);
        if let Some(key) = &args.api_key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.map_err(|e| e.to_string())?;
        let status = response.status();
        if status.as_u16() == 503 {
            busy += 1;
            let wait = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(1.0);
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
            continue;
        }
        let value: serde_json::Value = response.json().await.map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(format!("HTTP {status}: {value}"));
        }
        let tokens = value["usage"]["completion_tokens"].as_u64().unwrap_or(0) as usize;
        if value["choices"][0]["text"].as_str().is_none() {
            return Err(format!("no text in {value}"));
        }
        return Ok((started.elapsed().as_secs_f64(), tokens, busy));
    }
}

fn summarise(outcomes: &[Outcome], seconds: f64, rss: Option<(f64, f64)>) -> HttpReport {
    let mut latencies: Vec<f64> = outcomes
        .iter()
        .filter_map(|o| o.as_ref().ok())
        .map(|o| o.0)
        .collect();
    latencies.sort_by(f64::total_cmp);
    let quantile = |q: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        let i = ((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i]
    };
    let answered = latencies.len();
    let tokens: usize = outcomes
        .iter()
        .filter_map(|o| o.as_ref().ok())
        .map(|o| o.1)
        .sum();
    HttpReport {
        answered,
        failed: outcomes.len() - answered,
        busy_retries: outcomes
            .iter()
            .filter_map(|o| o.as_ref().ok())
            .map(|o| o.2)
            .sum(),
        seconds,
        requests_per_second: answered as f64 / seconds.max(1e-9),
        tokens_per_second: tokens as f64 / seconds.max(1e-9),
        p50: quantile(0.5),
        p99: quantile(0.99),
        server_peak_rss_mib: rss,
    }
}

/// `VmHWM` of a process, MiB.
fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_failures_are_counted() {
        let outcomes: Vec<Outcome> = (1..=100)
            .map(|i| Ok((i as f64, 10, usize::from(i == 1))))
            .chain(std::iter::once(Err("boom".to_string())))
            .collect();
        let r = summarise(&outcomes, 10.0, None);
        assert_eq!((r.answered, r.failed, r.busy_retries), (100, 1, 1));
        assert_eq!((r.p50, r.p99), (50.0, 99.0));
        assert_eq!(r.tokens_per_second, 100.0);
    }
}
