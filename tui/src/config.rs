//! Flags resolved once into what the commands use.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use geek_agent::remote::Remote;
use geek_agent::{AgentModel, AnswerAdapter, DemoBank, Excavator, ExcavatorConfig};
use geek_backend::{catalog, default_threads, paths, Engine, EngineConfig};
use geek_evals::calibration::{self, CalibrationKey};
use geek_evals::methods::{Answerer, Method};
use geek_retriever::{Bm25Index, Retriever};

use crate::cli::{BackendKind, GlobalArgs, RemoteArgs};
use geek_backend::remote::{RemoteConfig, RemoteModel};

/// Settings after defaults and environment are applied.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// Directory of catalogue models.
    pub models_dir: PathBuf,
    /// What the user named as the model (path or catalogue name).
    pub model_spec: String,
    /// llama.cpp threads.
    pub threads: i32,
    /// Context size.
    pub n_ctx: u32,
    /// GPU layers.
    pub n_gpu_layers: u32,
    /// Flash attention policy.
    pub flash_attention: geek_backend::FlashAttention,
    /// KV cache element type.
    pub kv_type: geek_backend::KvType,
    /// Shared data directory.
    pub data_dir: PathBuf,
    /// BM25 index directory.
    pub index_dir: PathBuf,
    /// Calibration offsets (`calibration.json`).
    pub calibration_store: PathBuf,
    /// Prompt-lookup draft length (0: off).
    pub lookup_draft: usize,
    /// A GGUF LoRA applied at run time, and its scale.
    pub lora: Option<crate::cli::LoraSpec>,
    /// What runs on it.
    pub lora_scope: crate::cli::LoraScope,
    /// Where the agent's passages come from.
    pub retriever: crate::passages::PassageSource,
    /// The dense encoder (catalogue name or directory).
    pub encoder: String,
    /// RRF weights of BM25 and dense.
    pub hybrid_weights: [f32; 2],
}

/// The model the commands run on: in process, or on a model server.
#[derive(Debug, Clone)]
pub enum LoadedModel {
    /// llama.cpp in this process; final answers on one of its LoRA adapters (index, scale)
    /// when `--lora-scope answer` says so.
    Local(Engine, Option<(usize, f32)>),
    /// An OpenAI-compatible server with llama-server's extensions.
    Remote(Remote),
}

impl LoadedModel {
    /// The model as the agent and the baselines use it.
    pub fn agent_model(&self) -> Result<Arc<dyn AgentModel>> {
        Ok(match self {
            LoadedModel::Local(engine, None) => Arc::new(engine.clone()),
            LoadedModel::Local(engine, Some((index, scale))) => {
                Arc::new(AnswerAdapter::new(engine.clone(), *index, *scale)?)
            }
            LoadedModel::Remote(remote) => Arc::new(remote.clone()),
        })
    }

    /// How many servers share the work (1 in process).
    pub fn servers(&self) -> usize {
        match self {
            LoadedModel::Local(..) => 1,
            LoadedModel::Remote(remote) => remote.servers().count(),
        }
    }

    /// What runs and calibrations record as the model: the GGUF file and its SHA-256, or the
    /// server and the model name it serves.
    pub fn identity(&self) -> Result<(PathBuf, String)> {
        Ok(match self {
            LoadedModel::Local(engine, answer) => {
                let path = engine.info().path.clone();
                let mut sha = catalog::sha256_cached(&path)?;
                // A LoRA makes another model: its runs and calibrations are its own.
                if let Some((lora, scale)) = engine.active_lora() {
                    let lora_sha = catalog::sha256_cached(&lora)?;
                    sha = format!("{sha}+lora:{lora_sha}@{scale}");
                }
                if let Some((index, scale)) = answer {
                    let lora = engine
                        .info()
                        .lora_adapters
                        .get(*index)
                        .with_context(|| format!("the engine has no LoRA adapter {index}"))?;
                    let lora_sha = catalog::sha256_cached(lora)?;
                    sha = format!("{sha}+answer-lora:{lora_sha}@{scale}");
                }
                (path, sha)
            }
            LoadedModel::Remote(remote) => {
                let name = remote.server().name();
                let endpoints: Vec<&str> = remote.servers().map(|s| s.endpoint()).collect();
                (
                    PathBuf::from(format!("{}#{name}", endpoints.join(","))),
                    format!("remote:{name}"),
                )
            }
        })
    }
}

/// Tokens one question may use when several share the engine.
pub const CONTEXT_PER_QUESTION: u32 = 4096;

impl Resolved {
    /// Applies defaults to the global flags.
    pub fn from_args(args: &GlobalArgs) -> Self {
        Resolved {
            models_dir: paths::models_dir(args.models_dir.as_deref()),
            model_spec: args
                .model
                .clone()
                .unwrap_or_else(|| catalog::default_model().name.to_string()),
            threads: args.threads.unwrap_or_else(default_threads),
            n_ctx: args.n_ctx,
            n_gpu_layers: args.n_gpu_layers,
            flash_attention: args.flash_attn,
            kv_type: args.kv_type,
            data_dir: paths::data_dir(args.data_dir.as_deref()),
            index_dir: args.index.clone().unwrap_or_else(paths::index_dir),
            calibration_store: paths::calibration_store(),
            lookup_draft: args.lookup_draft,
            lora: args.lora.clone(),
            lora_scope: args.lora_scope,
            retriever: args.retriever,
            encoder: args.encoder.clone(),
            hybrid_weights: [
                args.hybrid_weights.first().copied().unwrap_or(1.0),
                args.hybrid_weights.get(1).copied().unwrap_or(1.0),
            ],
        }
    }

    /// The same settings with another model (a path or catalogue name).
    pub fn with_model(&self, spec: &str) -> Resolved {
        Resolved {
            model_spec: spec.to_string(),
            ..self.clone()
        }
    }

    /// The model file named by `spec` (or the configured model).
    pub fn model_path(&self, spec: Option<&str>) -> Result<PathBuf> {
        Ok(catalog::resolve(
            spec.unwrap_or(&self.model_spec),
            &self.models_dir,
        )?)
    }

    /// The data directory, or an error that says how to point at it.
    pub fn require_data_dir(&self) -> Result<&std::path::Path> {
        if !self.data_dir.is_dir() {
            anyhow::bail!(
                "data directory {} not found: pass --data-dir or set GEEK_DATA_DIR",
                self.data_dir.display()
            );
        }
        Ok(&self.data_dir)
    }

    /// Engine settings for the configured model.
    pub fn engine_config(&self) -> Result<EngineConfig> {
        let mut config = EngineConfig::new(self.model_path(None)?)
            .with_threads(self.threads)
            .with_n_ctx(self.n_ctx);
        config.n_gpu_layers = self.n_gpu_layers;
        config.flash_attention = self.flash_attention;
        config.kv_type = self.kv_type;
        config.lookup_draft = self.lookup_draft;
        Ok(config)
    }

    /// The adapter final answers run on apart from the engine's (`--lora-scope answer`).
    fn answer_lora(&self) -> Option<(usize, f32)> {
        match (&self.lora, self.lora_scope) {
            (Some(lora), crate::cli::LoraScope::Answer) => Some((0, lora.scale)),
            _ => None,
        }
    }

    /// `engine` as the commands run it: final answers on the `--lora` adapter when its scope
    /// is `answer`.
    pub fn local(&self, engine: Engine) -> LoadedModel {
        LoadedModel::Local(engine, self.answer_lora())
    }

    /// Loads `config`'s model and switches `--lora` on (for every prompt unless its scope is
    /// `answer`).
    pub fn load(&self, config: EngineConfig) -> Result<Engine> {
        let engine = match &self.lora {
            Some(lora) => Engine::load(config.with_lora(&lora.path)).with_context(|| {
                format!("loading the model with --lora {}", lora.path.display())
            })?,
            None => Engine::load(config)?,
        };
        if let (Some(lora), crate::cli::LoraScope::All) = (&self.lora, self.lora_scope) {
            engine.set_lora(Some(0), lora.scale).wait()?;
        }
        Ok(engine)
    }
}

/// How the agent runs, as the commands' flags set it.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentOptions {
    /// Step budget per branch.
    pub max_steps: usize,
    /// Branches explored.
    pub explore: usize,
    /// Pre-answer drafting.
    pub pre_answer: bool,
    /// Retrieval on.
    pub retrieval: bool,
    /// Passages per retrieval.
    pub passages: usize,
    /// Seed of sampled branches.
    pub seed: u32,
    /// Tokens one question may use (when questions share the engine).
    pub context_limit: Option<usize>,
    /// Solved train questions shown before each question.
    pub demonstrations: usize,
    /// The final answer reasons in a sentence first.
    pub final_reasoning: bool,
}

impl Resolved {
    /// Loads the engine for the configured model with room for `parallel` questions at once,
    /// each exploring `explore` branches.
    pub fn load_engine(&self, parallel: usize, explore: usize) -> Result<Engine> {
        let mut config = self.engine_config()?;
        if parallel > 1 {
            config.n_ctx = config.n_ctx.max(CONTEXT_PER_QUESTION * parallel as u32);
        }
        config.max_sequences = ((parallel * (explore + 2) + 4) as u32).min(256);
        self.load(config)
    }

    /// The model of a command: on the server `remote` names, else loaded in process with room
    /// for `parallel` questions of `explore` branches.
    pub fn load_model(
        &self,
        remote: &RemoteArgs,
        parallel: usize,
        explore: usize,
    ) -> Result<LoadedModel> {
        if remote.endpoint.is_empty() {
            anyhow::ensure!(
                remote.backend == BackendKind::Local,
                "--backend openai needs --endpoint URL"
            );
            return Ok(self.local(self.load_engine(parallel, explore)?));
        }
        anyhow::ensure!(
            self.lora.is_none(),
            "--lora applies to the model loaded in this process; a model server loads its own adapters (llama-server --lora FILE)"
        );
        let runtime = self.runtime()?;
        let mut servers = Vec::new();
        for endpoint in &remote.endpoint {
            let mut config = RemoteConfig::new(endpoint.clone());
            config.api_key = remote.api_key.clone();
            config.model = remote.remote_model.clone();
            servers.push(runtime.block_on(RemoteModel::connect(config))?);
        }
        Ok(LoadedModel::Remote(Remote::pool(servers)?))
    }

    /// The BM25 index.
    pub fn open_index(&self) -> Result<Bm25Index> {
        Ok(Bm25Index::open(&self.index_dir)?)
    }

    /// The passages of `source` (the BM25 index, and the dense store beside it).
    pub fn open_passages(
        &self,
        source: crate::passages::PassageSource,
    ) -> Result<crate::passages::Passages> {
        crate::passages::Passages::open(
            source,
            &self.index_dir,
            || crate::passages::encoder(&self.encoder, &self.models_dir),
            self.hybrid_weights,
        )
    }

    /// The agent's retriever (`--retriever`).
    pub fn open_retriever(&self) -> Result<Arc<dyn Retriever>> {
        Ok(self.open_passages(self.retriever)?.retriever())
    }

    /// The excavation agent on `engine` with the options given.
    pub fn excavator(
        &self,
        model: LoadedModel,
        retriever: Option<Arc<dyn Retriever>>,
        options: &AgentOptions,
    ) -> Result<Excavator> {
        let builder = match model {
            LoadedModel::Local(engine, None) => Excavator::builder().backend(engine),
            LoadedModel::Local(engine, Some((index, scale))) => {
                Excavator::builder().backend(AnswerAdapter::new(engine, index, scale)?)
            }
            LoadedModel::Remote(remote) => Excavator::builder().backend(remote),
        };
        let mut builder = builder.config(ExcavatorConfig {
            max_steps: options.max_steps,
            explore: options.explore,
            pre_answer: options.pre_answer,
            retrieval: options.retrieval,
            passages: options.passages,
            seed: options.seed,
            context_limit: options.context_limit,
            demonstrations: options.demonstrations,
            final_reasoning: options.final_reasoning,
            prefix_cache: Some(paths::prompt_cache_dir()),
            ..ExcavatorConfig::default()
        });
        if let (true, Some(r)) = (options.retrieval, retriever) {
            builder = builder.retriever(r);
        }
        if options.demonstrations > 0 {
            match self.demo_bank() {
                Some(bank) => builder = builder.demonstrations(bank),
                None => tracing::warn!(
                    "no StrategyQA train file in {}: answering without demonstrations",
                    self.data_dir.display()
                ),
            }
        }
        Ok(builder.build()?)
    }

    /// The solved questions demonstrations are drawn from: StrategyQA train (never dev).
    fn demo_bank(&self) -> Option<Arc<DemoBank>> {
        let path = self.data_dir.join("strategyqa/train.json");
        match DemoBank::from_strategyqa(&path) {
            Ok(bank) => Some(Arc::new(bank)),
            Err(e) => {
                tracing::debug!(error = %e, "no demonstrations");
                None
            }
        }
    }

    /// The calibration key of `method` on `model`.
    pub fn calibration_key(&self, model: &LoadedModel, method: Method) -> Result<CalibrationKey> {
        Ok(CalibrationKey {
            model_sha256: model.identity()?.1,
            method: method.name().to_string(),
            prompt_version: method.prompt_version().to_string(),
        })
    }

    /// Gives `agent` the calibration `ask` and the TUI use: the offset fitted on train, else
    /// the contextual one (computed and stored the first time).
    pub async fn calibrate_agent(
        &self,
        model: &LoadedModel,
        agent: Excavator,
    ) -> Result<Excavator> {
        let key = self.calibration_key(model, Method::Geek)?;
        let agent = Arc::new(agent);
        let answerer = Answerer {
            model: model.agent_model()?,
            retriever: None,
            agent: Some(agent.clone()),
        };
        let offsets =
            calibration::offsets_for(&self.calibration_store, &key, &answerer, Method::Geek)
                .await?;
        drop(answerer);
        let mut agent = Arc::try_unwrap(agent)
            .map_err(|_| anyhow::anyhow!("the agent is still shared after calibration"))?;
        if let Some(c) = offsets.first() {
            agent.set_calibration(c.offset, c.describe());
        }
        Ok(agent)
    }

    /// The async runtime the commands run the libraries on.
    pub fn runtime(&self) -> Result<tokio::runtime::Runtime> {
        Ok(tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?)
    }
}
