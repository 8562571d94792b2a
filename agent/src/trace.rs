//! What an excavation did: the [`Trace`] (serde JSON, stable shape, `version` 1) and the
//! [`Event`]s streamed while it runs.
//!
//! ```json
//! {
//!   "version": 1, "question": "…", "answer": true, "yes_votes": 1, "no_votes": 0,
//!   "branches": [{
//!     "id": 0,
//!     "steps": [{"sub_question": "…", "hint": null, "answer": "…",
//!                "source": {"kind": "retrieved", "query": "…",
//!                           "passages": [{"id": "Llama-3", "title": "Llama", "score": 12.1}],
//!                           "cited": ["Llama-3"]}}],
//!     "actions": [{"action": "add_decomp", "note": null}, …],
//!     "final_answer": {"summary": "…", "answer": true, "yes_logprob": -0.4,
//!                      "no_logprob": -1.2, "forced": false}
//!   }],
//!   "tokens": {"decoded": 812, "unique": 790, "without_reuse": 9120},
//!   "model": "…", "retriever": "bm25", "prompt_version": "geek-prompts-v1",
//!   "config": {…}, "seconds": 3.2
//! }
//! ```

use serde::{Deserialize, Serialize};

/// One of the four actions the model chooses between.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Write the next sub-question.
    AddDecomp,
    /// Retrieve passages and extract a fact answering the current sub-question.
    Retrieve,
    /// Answer the current sub-question from the model's own knowledge.
    SelfAnswer,
    /// Summarise and answer yes or no.
    FinalAnswer,
}

impl Action {
    /// The word the model writes after `Action:`.
    pub fn keyword(self) -> &'static str {
        match self {
            Action::AddDecomp => "AddDecomp",
            Action::Retrieve => "Retrieve",
            Action::SelfAnswer => "SelfAnswer",
            Action::FinalAnswer => "FinalAnswer",
        }
    }

    /// The action written as `word`.
    pub fn from_keyword(word: &str) -> Option<Action> {
        [
            Action::AddDecomp,
            Action::Retrieve,
            Action::SelfAnswer,
            Action::FinalAnswer,
        ]
        .into_iter()
        .find(|a| a.keyword() == word.trim())
    }
}

/// A passage shown to the extractor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PassageRef {
    /// Passage id.
    pub id: String,
    /// Its title.
    pub title: String,
    /// Retriever score.
    pub score: f32,
}

/// Where a sub-question's answer came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AnswerSource {
    /// Extracted from retrieved passages.
    Retrieved {
        /// The query sent to the retriever.
        query: String,
        /// The passages shown, best first.
        passages: Vec<PassageRef>,
        /// Ids of the passages the fact cites (always among `passages`).
        cited: Vec<String>,
        /// Why retrieval gave nothing, when it failed.
        error: Option<String>,
        /// Why the passages gave no answer, when they did not (the extractor said so, or its
        /// fact was not supported by what it cited); the answer then came from the model.
        #[serde(default)]
        unsupported: Option<String>,
    },
    /// Answered by the model itself.
    Model,
}

/// A sub-question and its answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    /// The sub-question as written (may refer to earlier answers as `#1`).
    pub sub_question: String,
    /// The guessed answer drafted with pre-answer on, passed to the extractor.
    pub hint: Option<String>,
    /// The fact that answers it, once found.
    pub answer: Option<String>,
    /// Where the answer came from.
    pub source: Option<AnswerSource>,
}

/// One chosen action, in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionRecord {
    /// The action.
    pub action: Action,
    /// Why it was rejected or forced, when it was.
    pub note: Option<String>,
    /// Where its time went.
    #[serde(default)]
    pub timing: ActionTiming,
}

/// Where one action's time went (seconds) and the tokens it decoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ActionTiming {
    /// Wall time of the action.
    pub seconds: f64,
    /// Prompt tokens decoded (appended text and the prompts of generations).
    pub prefilled: usize,
    /// Seconds spent on them.
    pub prefill_seconds: f64,
    /// Tokens generated.
    pub generated: usize,
    /// Seconds spent generating (sampling included).
    pub generation_seconds: f64,
    /// Of which choosing tokens (grammar included).
    pub sampling_seconds: f64,
    /// Tokens drafted by prompt lookup, and kept.
    pub drafted: usize,
    /// Drafted tokens kept.
    pub accepted: usize,
    /// Seconds waiting for the retriever.
    pub retrieval_seconds: f64,
}

impl ActionTiming {
    /// Counts an append that took `seconds`.
    pub fn add_prefill(&mut self, stats: &geek_backend::PrefillStats, seconds: f64) {
        self.prefilled += stats.decoded;
        self.prefill_seconds += seconds;
    }

    /// Counts a generation.
    pub fn add_generation(&mut self, done: &geek_backend::Completion) {
        self.prefilled += done.prefill.decoded;
        self.prefill_seconds += done.prefill_seconds;
        self.generated += done.tokens.len();
        self.generation_seconds += done.generation_seconds;
        self.sampling_seconds += done.sampling_seconds;
        self.drafted += done.drafted;
        self.accepted += done.accepted;
    }

    /// Adds another action's figures.
    pub fn add(&mut self, other: &ActionTiming) {
        self.seconds += other.seconds;
        self.prefilled += other.prefilled;
        self.prefill_seconds += other.prefill_seconds;
        self.generated += other.generated;
        self.generation_seconds += other.generation_seconds;
        self.sampling_seconds += other.sampling_seconds;
        self.drafted += other.drafted;
        self.accepted += other.accepted;
        self.retrieval_seconds += other.retrieval_seconds;
    }
}

/// The end of a branch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinalAnswer {
    /// The model's one-line summary of the facts.
    pub summary: String,
    /// `yes_logprob − no_logprob + offset > 0` (the trace's `answer_offset`).
    pub answer: bool,
    /// log p(" yes") after `Answer:`.
    pub yes_logprob: f32,
    /// log p(" no") after `Answer:`.
    pub no_logprob: f32,
    /// The step budget or context ran out: the agent chose FinalAnswer, not the model.
    pub forced: bool,
}

/// One line of excavation (several with strategy exploration).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Branch {
    /// 0 for the greedy branch.
    pub id: usize,
    /// Sub-questions and answers, in order.
    pub steps: Vec<Step>,
    /// Every action, in order.
    pub actions: Vec<ActionRecord>,
    /// How it ended.
    pub final_answer: FinalAnswer,
    /// Where the final answer's time went.
    #[serde(default)]
    pub final_timing: ActionTiming,
}

/// Token accounting of one question, to prove KV-cache reuse.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCounts {
    /// Tokens decoded for this question (prompt chunks and generated tokens).
    pub decoded: usize,
    /// Distinct token positions of this question's sequences (shared fork prefixes and the
    /// cached system prompt counted once, the latter not at all).
    pub unique: usize,
    /// What a stateless API re-sending the whole history at every call would decode.
    pub without_reuse: usize,
}

impl TokenCounts {
    /// Counts an append (or the prompt part of a request).
    pub fn add_prefill(&mut self, stats: &geek_backend::PrefillStats) {
        self.decoded += stats.decoded;
        self.without_reuse += stats.total;
    }

    /// Counts a generation: its prompt decoding and its tokens (the last one stays undecoded
    /// until the next request).
    pub fn add_generation(&mut self, done: &geek_backend::Completion) {
        self.decoded += done.prefill.decoded + done.tokens.len().saturating_sub(1);
        self.without_reuse += done.prefill.total + done.tokens.len();
    }
}

/// Settings recorded with a trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceConfig {
    /// Step budget per branch.
    pub max_steps: usize,
    /// Branches explored.
    pub explore: usize,
    /// Pre-answer drafting.
    pub pre_answer: bool,
    /// Retrieval allowed.
    pub retrieval: bool,
    /// Passages shown per retrieval.
    pub passages: usize,
}

/// Everything one excavation did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trace {
    /// Shape version of this JSON.
    pub version: u32,
    /// The question.
    pub question: String,
    /// The voted answer.
    pub answer: bool,
    /// Branches that answered yes.
    pub yes_votes: usize,
    /// Branches that answered no.
    pub no_votes: usize,
    /// Every branch, greedy first.
    pub branches: Vec<Branch>,
    /// Token accounting.
    pub tokens: TokenCounts,
    /// Model description.
    pub model: String,
    /// Retriever name.
    pub retriever: String,
    /// [`crate::prompts::PROMPT_VERSION`].
    pub prompt_version: String,
    /// Settings.
    pub config: TraceConfig,
    /// Wall time.
    pub seconds: f64,
    /// The calibration offset added to every branch's margin before it voted.
    #[serde(default)]
    pub answer_offset: f32,
    /// Where the offset came from (`fitted on N train`, `contextual`), when one was set.
    #[serde(default)]
    pub calibration: Option<String>,
}

impl Trace {
    /// The greedy branch.
    pub fn main_branch(&self) -> &Branch {
        &self.branches[0]
    }

    /// The mean over branches of `log p(yes) − log p(no)`, before any offset.
    pub fn margin(&self) -> f32 {
        let n = self.branches.len().max(1) as f32;
        self.branches
            .iter()
            .map(|b| b.final_answer.yes_logprob - b.final_answer.no_logprob)
            .sum::<f32>()
            / n
    }

    /// `decoded / unique`: 1.0 means nothing was decoded twice.
    pub fn kv_ratio(&self) -> f64 {
        self.tokens.decoded as f64 / self.tokens.unique.max(1) as f64
    }
}

/// What happens during an excavation, as it happens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A branch starts an action.
    StepStarted {
        /// Branch id.
        branch: usize,
        /// 1-based action number within the branch.
        step: usize,
        /// The action.
        action: Action,
    },
    /// A sub-question was written.
    SubQuestion {
        /// Branch id.
        branch: usize,
        /// The sub-question.
        text: String,
    },
    /// Passages came back from the retriever.
    Retrieved {
        /// Branch id.
        branch: usize,
        /// The query.
        query: String,
        /// The passages shown to the model.
        passages: Vec<PassageRef>,
    },
    /// A sub-question got its answer.
    FactExtracted {
        /// Branch id.
        branch: usize,
        /// The fact.
        fact: String,
        /// Cited passage ids (empty for self answers).
        citations: Vec<String>,
    },
    /// Text the model is generating.
    TokenStream {
        /// Branch id.
        branch: usize,
        /// New text.
        text: String,
    },
    /// A branch answered.
    BranchAnswered {
        /// Branch id.
        branch: usize,
        /// Its final answer.
        answer: FinalAnswer,
    },
    /// The excavation's voted answer.
    Answer {
        /// yes or no.
        answer: bool,
        /// Branches for yes.
        yes_votes: usize,
        /// Branches for no.
        no_votes: usize,
    },
    /// Something failed; the excavation goes on where it can.
    Error {
        /// Branch id.
        branch: usize,
        /// What went wrong.
        message: String,
    },
}
