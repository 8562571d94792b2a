//! The requests handles send to the engine thread, and the sequence ids they share.

use std::sync::Mutex;

use tokio::sync::{mpsc as tmpsc, oneshot};

use crate::sampling::GenerateParams;
use crate::types::{ChatMessage, EngineStats, GenEvent, PrefillStats, PromptPart};
use crate::{Error, Result};

pub(crate) enum Input {
    Parts(Vec<PromptPart>),
    Tokens(Vec<i32>),
}

pub(crate) type ReplyTx<T> = oneshot::Sender<Result<T>>;

pub(crate) enum Command {
    Tokenize {
        text: String,
        add_special: bool,
        parse_special: bool,
        reply: ReplyTx<Vec<i32>>,
    },
    Detokenize {
        tokens: Vec<i32>,
        reply: ReplyTx<String>,
    },
    ChatPrompt {
        messages: Vec<ChatMessage>,
        add_assistant: bool,
        reply: ReplyTx<String>,
    },
    ChatParts {
        messages: Vec<ChatMessage>,
        add_assistant: bool,
        reply: ReplyTx<Vec<PromptPart>>,
    },
    Append {
        seq: i32,
        input: Input,
        reply: ReplyTx<PrefillStats>,
    },
    Generate {
        seq: i32,
        params: Box<GenerateParams>,
        events: tmpsc::UnboundedSender<GenEvent>,
    },
    Score {
        seq: i32,
        candidates: Vec<String>,
        reply: ReplyTx<Vec<f32>>,
    },
    Logits {
        seq: i32,
        reply: ReplyTx<Vec<f32>>,
    },
    TokenLogProbs {
        tokens: Vec<i32>,
        from: usize,
        reply: ReplyTx<Vec<f32>>,
    },
    Tokens {
        seq: i32,
        reply: ReplyTx<Vec<i32>>,
    },
    Fork {
        src: i32,
        dst: i32,
        reply: ReplyTx<()>,
    },
    Truncate {
        seq: i32,
        len: usize,
        reply: ReplyTx<()>,
    },
    Release {
        seq: i32,
    },
    SaveState {
        seq: i32,
        path: std::path::PathBuf,
        reply: ReplyTx<usize>,
    },
    LoadState {
        seq: i32,
        path: std::path::PathBuf,
        reply: ReplyTx<usize>,
    },
    SetLora {
        index: Option<usize>,
        scale: f32,
        reply: ReplyTx<()>,
    },
    PinLora {
        seq: i32,
        lora: Option<(usize, f32)>,
        reply: ReplyTx<()>,
    },
    Stats {
        reply: ReplyTx<EngineStats>,
    },
}

/// Sequence ids in use; shared by handles (which allocate) and the worker (scratch sequences).
#[derive(Debug)]
pub(crate) struct SeqIds {
    free: Mutex<Vec<i32>>,
    pub(crate) max: usize,
}

impl SeqIds {
    pub(crate) fn new(max: u32) -> Self {
        SeqIds {
            free: Mutex::new((0..max as i32).rev().collect()),
            max: max as usize,
        }
    }

    pub(crate) fn alloc(&self) -> Result<i32> {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        free.pop().ok_or(Error::NoFreeSequence { max: self.max })
    }

    pub(crate) fn release(&self, id: i32) {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        free.push(id);
    }
}
