//! The engine thread of the TUI: owns the model, the index and a tokio runtime, runs one
//! excavation at a time and reports back over a channel, so the UI thread only draws.

use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;

use geek_agent::Excavator;
use geek_backend::catalog;

use super::state::{Report, Request, Settings};
use crate::cli::{BackendKind, RemoteArgs};
use crate::config::{AgentOptions, LoadedModel, Resolved};

struct Loaded {
    model: LoadedModel,
    /// The passages of `--retriever` (BM25, dense or hybrid).
    index: Option<Arc<crate::passages::Passages>>,
    /// The agent for the settings it was built with (it caches the system prompt).
    agent: Option<(Settings, Arc<Excavator>)>,
}

/// Starts the engine thread.
pub fn spawn(config: Resolved, settings: Settings) -> (Sender<Request>, Receiver<Report>) {
    let (req_tx, req_rx) = std::sync::mpsc::channel::<Request>();
    let (rep_tx, rep_rx) = std::sync::mpsc::channel::<Report>();
    std::thread::Builder::new()
        .name("geek-tui-engine".into())
        .spawn(move || serve(config, settings, req_rx, rep_tx))
        .expect("spawn the engine thread");
    (req_tx, rep_rx)
}

/// Loads `model`: a catalogue name or GGUF path runs in process; an `http(s)://` URL is a
/// model server (llama-server or `geek serve`; its key from `GEEK_ENDPOINT_KEY`).
fn load(config: &Resolved, model: &str, out: &Sender<Report>) -> Option<Loaded> {
    let is_server = model.starts_with("http://") || model.starts_with("https://");
    if !is_server {
        if let Err(e) = catalog::resolve(model, &config.models_dir) {
            let _ = out.send(Report::Problem(format!(
                "{e}. Pull it, or set the model path (or a server's URL) in settings (s)."
            )));
            return None;
        }
    }
    let remote = RemoteArgs {
        backend: BackendKind::Local,
        endpoint: if is_server {
            vec![model.to_string()]
        } else {
            Vec::new()
        },
        api_key: std::env::var("GEEK_ENDPOINT_KEY").ok(),
        remote_model: None,
    };
    let loaded = match config.with_model(model).load_model(&remote, 1, MAX_EXPLORE) {
        Ok(m) => m,
        Err(e) => {
            let _ = out.send(Report::Problem(format!(
                "cannot load the model: {e:#}. Choose another in settings (s)."
            )));
            return None;
        }
    };
    let index = match config.open_passages(config.retriever) {
        Ok(i) => Some(Arc::new(i)),
        Err(e) => {
            let _ = out.send(Report::Problem(format!(
                "{e:#}. Until then questions are answered without retrieval (settings: s)."
            )));
            None
        }
    };
    let name = match &loaded {
        LoadedModel::Local(engine, _) => engine.info().path.file_name().map_or_else(
            || engine.info().path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        ),
        LoadedModel::Remote(_) => match loaded.agent_model() {
            Ok(model) => model.describe(),
            Err(e) => e.to_string(),
        },
    };
    let _ = out.send(Report::Ready {
        model: name,
        index_documents: index.as_ref().map_or(0, |i| i.bm25().meta().documents),
    });
    Some(Loaded {
        model: loaded,
        index,
        agent: None,
    })
}

/// Branches the settings panel allows.
const MAX_EXPLORE: usize = 8;

/// The agent for `settings`, calibrated as `geek ask` is.
fn build_agent(
    config: &Resolved,
    loaded: &Loaded,
    settings: &Settings,
    runtime: &tokio::runtime::Runtime,
) -> anyhow::Result<Excavator> {
    let options = AgentOptions {
        max_steps: settings.max_steps,
        explore: settings.explore.min(MAX_EXPLORE),
        pre_answer: false,
        retrieval: settings.retrieval,
        passages: 3,
        seed: 0,
        context_limit: None,
        demonstrations: 0,
        final_reasoning: false,
    };
    let retriever = loaded.index.as_ref().map(|i| i.retriever());
    let agent = config.excavator(loaded.model.clone(), retriever, &options)?;
    runtime.block_on(config.calibrate_agent(&loaded.model, agent))
}

// Longer than 80 lines: the UI worker's loop: one arm per request kind the UI sends.
fn serve(config: Resolved, settings: Settings, requests: Receiver<Request>, out: Sender<Report>) {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            let _ = out.send(Report::Problem(format!(
                "cannot start the async runtime: {e}"
            )));
            return;
        }
    };
    let mut loaded = load(&config, &settings.model, &out);
    let mut running: Option<tokio::task::JoinHandle<()>> = None;
    while let Ok(request) = requests.recv() {
        match request {
            Request::Ask { question, settings } => {
                let Some(l) = loaded.as_mut() else {
                    let _ = out.send(Report::Problem(
                        "no model is loaded: set one in settings (s)".into(),
                    ));
                    continue;
                };
                let agent = match &l.agent {
                    Some((s, a)) if *s == settings => a.clone(),
                    _ => match build_agent(&config, l, &settings, &runtime) {
                        Ok(a) => {
                            let a = Arc::new(a);
                            l.agent = Some((settings.clone(), a.clone()));
                            a
                        }
                        Err(e) => {
                            let _ = out.send(Report::Problem(format!("{e:#}")));
                            continue;
                        }
                    },
                };
                let out = out.clone();
                running = Some(runtime.spawn(async move {
                    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                    let forward = {
                        let out = out.clone();
                        tokio::spawn(async move {
                            while let Some(e) = rx.recv().await {
                                let _ = out.send(Report::Event(e));
                            }
                        })
                    };
                    let result = agent.run_streaming(&question, tx).await;
                    let _ = forward.await;
                    let _ = out.send(match result {
                        Ok(trace) => Report::Done(Box::new(trace)),
                        Err(e) => Report::Problem(format!("the excavation failed: {e}")),
                    });
                }));
            }
            Request::Cancel => {
                if let Some(task) = running.take() {
                    if !task.is_finished() {
                        task.abort();
                        let _ = out.send(Report::Cancelled);
                    }
                }
            }
            Request::Passage(id) => {
                let found = loaded
                    .as_ref()
                    .and_then(|l| l.index.as_ref())
                    .map(|i| i.bm25().get(&id));
                let _ = out.send(match found {
                    Some(Ok(Some(p))) => Report::Passage {
                        title: format!("{} ({})", p.title, p.id),
                        text: p.text,
                    },
                    Some(Ok(None)) | None => {
                        Report::Problem(format!("passage {id} is not in the local index"))
                    }
                    Some(Err(e)) => Report::Problem(e.to_string()),
                });
            }
            Request::LoadModel(model) => {
                if let Some(task) = running.take() {
                    task.abort();
                }
                // Free the old model before loading the new one.
                drop(loaded.take());
                loaded = load(&config, &model, &out);
            }
        }
    }
}
