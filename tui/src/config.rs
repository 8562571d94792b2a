//! Flags resolved once into what the commands use.

use std::path::PathBuf;

use anyhow::Result;
use geek_backend::{catalog, default_threads, EngineConfig};

use crate::cli::GlobalArgs;

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
}

impl Resolved {
    /// Applies defaults to the global flags.
    pub fn from_args(args: &GlobalArgs) -> Self {
        Resolved {
            models_dir: catalog::models_dir(args.models_dir.as_deref()),
            model_spec: args
                .model
                .clone()
                .unwrap_or_else(|| catalog::default_model().name.to_string()),
            threads: args.threads.unwrap_or_else(default_threads),
            n_ctx: args.n_ctx,
            n_gpu_layers: args.n_gpu_layers,
            flash_attention: args.flash_attn,
            kv_type: args.kv_type,
            data_dir: geek_retriever::corpus::data_dir(args.data_dir.as_deref()),
            index_dir: args
                .index
                .clone()
                .unwrap_or_else(geek_retriever::default_index_dir),
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
        Ok(config)
    }
}
