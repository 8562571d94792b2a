//! A `geek serve` on loopback for the tests that drive it over HTTP.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use super::{calibration_store, model_path};

/// A running `geek serve`, killed when dropped.
pub struct Server {
    /// The server process.
    pub child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
}

impl Server {
    /// Starts it on the test model without retrieval or calibration, plus `extra` flags.
    pub fn start(extra: &[&str]) -> Server {
        let model = model_path();
        let mut child = Command::new(env!("CARGO_BIN_EXE_geek"))
            .args(["--model", model.to_str().unwrap(), "serve", "--port", "0"])
            .args(["--no-retrieval", "--no-calibration"])
            .args(extra)
            .env("GEEK_THREADS", "2")
            .env("GEEK_CALIBRATION", calibration_store())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("geek serve starts");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let base = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_string();
        Server { child, base }
    }

    /// `curl` with `args` on `path`: the HTTP status, the headers and the body.
    pub fn curl(&self, path: &str, args: &[&str]) -> (u16, String, String) {
        let out = Command::new("curl")
            .args(["-s", "-D", "-", "-w", "\n%{http_code}"])
            .args(args)
            .arg(format!("{}{path}", self.base))
            .output()
            .expect("curl runs");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (rest, code) = text.trim_end().rsplit_once('\n').unwrap();
        let (headers, body) = rest.split_once("\r\n\r\n").unwrap_or((rest, ""));
        (code.parse().unwrap(), headers.to_string(), body.to_string())
    }

    /// POSTs the JSON `body` to `path`.
    pub fn post(&self, path: &str, body: &str, extra: &[&str]) -> (u16, String, String) {
        let mut args = vec!["-H", "content-type: application/json", "-d", body];
        args.extend_from_slice(extra);
        self.curl(path, &args)
    }

    /// The value of metric `name`.
    pub fn metric(&self, name: &str, extra: &[&str]) -> f64 {
        let (_, _, body) = self.curl("/metrics", extra);
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} missing from {body}"))
            .parse()
            .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
