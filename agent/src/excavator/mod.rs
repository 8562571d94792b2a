//! The excavation loop: [`Excavator`] and its settings; [`branch`] runs one line of
//! excavation, [`final_answer`] answers from the facts found.

mod branch;
mod citations;
mod final_answer;

use branch::BranchRun;

use std::sync::Arc;
use std::time::Instant;

use geek_backend::PromptPart;
use geek_retriever::Retriever;
use tokio::sync::mpsc::UnboundedSender;

use crate::demos::DemoBank;
use crate::model::{AgentModel, AgentSequence};
use crate::prompts;
use crate::trace::{Event, TokenCounts, Trace, TraceConfig};
use crate::{Error, Result};

/// Tokens kept free for a retrieval step plus the final answer; below that the agent answers.
const CONTEXT_RESERVE: usize = 600;

/// Settings of an [`Excavator`].
#[derive(Debug, Clone, PartialEq)]
pub struct ExcavatorConfig {
    /// Actions per branch before FinalAnswer is forced (rejected repeats count).
    pub max_steps: usize,
    /// Branches explored (strategy exploration); answers are voted.
    pub explore: usize,
    /// Draft the remaining sub-questions with guessed answers; the guess guides retrieval.
    pub pre_answer: bool,
    /// Allow the Retrieve action.
    pub retrieval: bool,
    /// Passages shown to the extractor per retrieval.
    pub passages: usize,
    /// Temperature of the sampled first sub-question of branches 1..explore.
    pub explore_temperature: f32,
    /// Seed of branch `i`'s sampling is `seed + i`.
    pub seed: u32,
    /// Tokens one question may use (default: the model's context size). Set it when several
    /// questions share one engine's KV cache.
    pub context_limit: Option<usize>,
    /// Demonstrations shown before the question (needs a [`DemoBank`]).
    pub demonstrations: usize,
    /// A retrieved fact whose content words are found in its cited passages less than this
    /// share of the time is rejected as unsupported (then answered with SelfAnswer).
    pub min_support: f32,
    /// The final answer reasons in a sentence before it answers (measured on train: no more
    /// accurate than answering from the facts directly, and slower; off by default).
    pub final_reasoning: bool,
    /// A directory where the decoded system prompt is saved and loaded from (keyed by model,
    /// cache layout and prompt), so a new process does not decode it again.
    pub prefix_cache: Option<std::path::PathBuf>,
    /// Calibration: added to each branch's `log p(yes) − log p(no)` before it answers.
    pub answer_offset: f32,
    /// Where the offset came from, recorded in the trace.
    pub calibration: Option<String>,
}

impl Default for ExcavatorConfig {
    fn default() -> Self {
        ExcavatorConfig {
            max_steps: 8,
            explore: 1,
            pre_answer: false,
            retrieval: true,
            passages: 3,
            explore_temperature: 0.8,
            seed: 0,
            context_limit: None,
            demonstrations: 0,
            min_support: 0.35,
            final_reasoning: false,
            prefix_cache: None,
            answer_offset: 0.0,
            calibration: None,
        }
    }
}

impl ExcavatorConfig {
    /// At least one step and between 1 and 16 branches.
    fn check_limits(&self) -> Result<()> {
        if self.max_steps == 0 || self.explore == 0 {
            return Err(Error::Config(
                "max_steps and explore must be at least 1".into(),
            ));
        }
        if self.explore > 16 {
            return Err(Error::Config("explore is at most 16".into()));
        }
        Ok(())
    }
}

/// Builds an [`Excavator`].
#[derive(Default)]
pub struct ExcavatorBuilder {
    model: Option<Arc<dyn AgentModel>>,
    retriever: Option<Arc<dyn Retriever>>,
    demos: Option<Arc<DemoBank>>,
    config: ExcavatorConfig,
}

impl ExcavatorBuilder {
    /// The language model (an [`geek_backend::Engine`], or any [`AgentModel`]).
    pub fn backend(mut self, model: impl AgentModel + 'static) -> Self {
        self.model = Some(Arc::new(model));
        self
    }

    /// The retriever (any [`Retriever`], including an `Arc<dyn Retriever>`).
    pub fn retriever(mut self, retriever: impl Retriever + 'static) -> Self {
        self.retriever = Some(Arc::new(retriever));
        self
    }

    /// Solved questions to show the most similar of before each question
    /// ([`ExcavatorConfig::demonstrations`] of them).
    pub fn demonstrations(mut self, bank: Arc<DemoBank>) -> Self {
        self.demos = Some(bank);
        self
    }

    /// Step budget per branch (default 8).
    pub fn max_steps(mut self, n: usize) -> Self {
        self.config.max_steps = n;
        self
    }

    /// Branches explored (default 1).
    pub fn explore(mut self, k: usize) -> Self {
        self.config.explore = k;
        self
    }

    /// Pre-answer drafting (default off).
    pub fn pre_answer(mut self, on: bool) -> Self {
        self.config.pre_answer = on;
        self
    }

    /// Allow retrieval (default on when a retriever is set).
    pub fn retrieval(mut self, on: bool) -> Self {
        self.config.retrieval = on;
        self
    }

    /// Passages shown per retrieval (default 3).
    pub fn passages(mut self, n: usize) -> Self {
        self.config.passages = n;
        self
    }

    /// A calibration offset and where it came from (see [`ExcavatorConfig::answer_offset`]).
    pub fn calibration(mut self, offset: f32, source: impl Into<String>) -> Self {
        self.config.answer_offset = offset;
        self.config.calibration = Some(source.into());
        self
    }

    /// Every setting at once.
    pub fn config(mut self, config: ExcavatorConfig) -> Self {
        self.config = config;
        self
    }

    /// Checks the settings.
    pub fn build(self) -> Result<Excavator> {
        let model = self
            .model
            .ok_or_else(|| Error::Config("no backend: call .backend(engine)".into()))?;
        let mut config = self.config;
        config.check_limits()?;
        if self.retriever.is_none() {
            config.retrieval = false;
        }
        if config.retrieval && config.passages == 0 {
            return Err(Error::Config("passages must be at least 1".into()));
        }
        Ok(Excavator {
            model,
            retriever: self.retriever,
            demos: self.demos,
            config,
            prefix: Arc::new(tokio::sync::Mutex::new(None)),
        })
    }
}

/// The system prompt, decoded once and forked for every question.
struct CachedPrefix {
    parts: Vec<PromptPart>,
    seq: Box<dyn AgentSequence>,
    len: usize,
}

/// Answers yes/no questions by gradual knowledge excavation (GEEK).
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use geek_agent::Excavator;
/// let engine = geek_backend::Engine::load(geek_backend::EngineConfig::new("model.gguf"))?;
/// let index = geek_retriever::Bm25Index::open(std::path::Path::new("index"))?;
/// let agent = Excavator::builder().backend(engine).retriever(index).max_steps(8).build()?;
/// let trace = agent.run("Could a llama give birth twice during the Vietnam War?").await?;
/// println!("{}", if trace.answer { "yes" } else { "no" });
/// # Ok(()) }
/// ```
pub struct Excavator {
    model: Arc<dyn AgentModel>,
    retriever: Option<Arc<dyn Retriever>>,
    demos: Option<Arc<DemoBank>>,
    config: ExcavatorConfig,
    prefix: Arc<tokio::sync::Mutex<Option<CachedPrefix>>>,
}

impl Excavator {
    /// The same agent with another step budget and number of branches (a server's per-request
    /// limits), sharing the model, retriever and decoded system prompt.
    pub fn with_limits(&self, max_steps: usize, explore: usize) -> Result<Excavator> {
        let config = ExcavatorConfig {
            max_steps,
            explore,
            ..self.config.clone()
        };
        config.check_limits()?;
        Ok(Excavator {
            model: self.model.clone(),
            retriever: self.retriever.clone(),
            demos: self.demos.clone(),
            config,
            prefix: self.prefix.clone(),
        })
    }

    /// Starts a builder.
    pub fn builder() -> ExcavatorBuilder {
        ExcavatorBuilder::default()
    }

    /// The settings.
    pub fn config(&self) -> &ExcavatorConfig {
        &self.config
    }

    /// Sets the calibration offset (see [`ExcavatorConfig::answer_offset`]), keeping the
    /// cached system prompt.
    pub fn set_calibration(&mut self, offset: f32, source: impl Into<String>) {
        self.config.answer_offset = offset;
        self.config.calibration = Some(source.into());
    }

    /// Excavates `question` and returns the trace.
    pub async fn run(&self, question: &str) -> Result<Trace> {
        self.run_inner(question, None).await
    }

    /// Like [`run`](Self::run), sending [`Event`]s as they happen.
    pub async fn run_streaming(
        &self,
        question: &str,
        events: UnboundedSender<Event>,
    ) -> Result<Trace> {
        self.run_inner(question, Some(events)).await
    }

    /// `log p(yes) − log p(no)` of the final answer to a content-free question with a
    /// content-free fact (`input`, e.g. "N/A"), with no excavation: the bias contextual
    /// calibration (Zhao et al. 2021) removes.
    pub async fn content_free_margin(&self, input: &str) -> Result<f32> {
        let facts = [(input.to_string(), input.to_string())];
        let (_, scores, _, _) = final_answer::final_answer(
            &*self.model,
            input,
            &facts,
            self.config.final_reasoning,
            &mut |_| {},
        )
        .await?;
        Ok(scores[0] - scores[1])
    }

    /// A sequence holding the system prompt and the question, and the length of its shared
    /// system part.
    async fn question_sequence(
        &self,
        question: &str,
    ) -> Result<(Box<dyn AgentSequence>, usize, TokenCounts)> {
        let demos = self.demos.as_ref().map_or_else(Vec::new, |bank| {
            bank.nearest(question, self.config.demonstrations)
        });
        let user = prompts::user_with_demonstrations(question, &demos);
        let prompt = self.model.chat_prompt(prompts::SYSTEM, &user).await?;
        // Everything before the user's message is the same for every question.
        let split = prompt
            .iter()
            .rposition(|p| !p.special && p.text == user)
            .unwrap_or(prompt.len());
        let (head, tail) = prompt.split_at(split);
        let mut guard = self.prefix.lock().await;
        if guard.as_ref().is_none_or(|p| p.parts != head) {
            let (seq, len) = self.decode_prefix(head).await?;
            *guard = Some(CachedPrefix {
                parts: head.to_vec(),
                seq,
                len,
            });
        }
        let prefix = guard.as_ref().expect("prefix just set");
        let seq = prefix.seq.fork().await?;
        let prefix_len = prefix.len;
        drop(guard);
        let stats = seq.append_parts(tail).await?;
        let counts = TokenCounts {
            decoded: stats.decoded,
            unique: stats.total - prefix_len,
            without_reuse: stats.total,
        };
        Ok((seq, stats.total, counts))
    }

    /// A sequence holding the shared head of every question's prompt: loaded from the prefix
    /// cache when it was saved there, else decoded (and saved).
    async fn decode_prefix(&self, head: &[PromptPart]) -> Result<(Box<dyn AgentSequence>, usize)> {
        let file = match (&self.config.prefix_cache, self.model.state_key()) {
            (Some(dir), Some(key)) => {
                let text: String = head.iter().map(|p| p.text.as_str()).collect();
                let id = fnv1a(&format!("{key}\n{}\n{text}", prompts::PROMPT_VERSION));
                Some(dir.join(format!("prefix-{id:016x}.kv")))
            }
            _ => None,
        };
        if let Some(file) = file.as_ref().filter(|f| f.is_file()) {
            let seq = self.model.sequence()?;
            match seq.load_state(file).await {
                Ok(len) => return Ok((seq, len)),
                Err(e) => {
                    tracing::warn!(file = %file.display(), error = %e, "cannot load the saved system prompt; decoding it")
                }
            }
        }
        let seq = self.model.sequence()?;
        let stats = seq.append_parts(head).await?;
        seq.settle().await?;
        if let Some(file) = file {
            let saved = match file.parent() {
                Some(dir) => std::fs::create_dir_all(dir).map_err(|e| Error::Config(e.to_string())),
                None => Ok(()),
            };
            if let Err(e) = match saved {
                Ok(()) => seq.save_state(&file).await,
                Err(e) => Err(e),
            } {
                tracing::warn!(file = %file.display(), error = %e, "cannot save the system prompt");
            }
        }
        Ok((seq, stats.total))
    }

    // Longer than 80 lines: the excavation of one question: branches started, run concurrently, voted and assembled into the trace with its token and time accounting.
    async fn run_inner(
        &self,
        question: &str,
        events: Option<UnboundedSender<Event>>,
    ) -> Result<Trace> {
        let question = question.trim();
        if question.is_empty() {
            return Err(Error::EmptyQuestion);
        }
        let start = Instant::now();
        let (root, question_len, mut tokens) = self.question_sequence(question).await?;
        let mut seqs = vec![root];
        for _ in 1..self.config.explore {
            let fork = seqs[0].fork().await?;
            seqs.push(fork);
        }
        let runs = seqs.into_iter().enumerate().map(|(id, seq)| {
            let first_seed = (id > 0).then(|| self.config.seed.wrapping_add(id as u32));
            BranchRun::new(
                self,
                id,
                question,
                seq,
                question_len,
                events.clone(),
                first_seed,
            )
            .run()
        });
        let results = futures::future::join_all(runs).await;
        let mut branches = Vec::new();
        let mut first_error = None;
        for result in results {
            match result {
                Ok((branch, counts, final_len)) => {
                    tokens.decoded += counts.decoded;
                    tokens.without_reuse += counts.without_reuse;
                    tokens.unique += counts.unique + final_len.saturating_sub(question_len);
                    branches.push(branch);
                }
                Err(e) => {
                    emit(
                        &events,
                        Event::Error {
                            branch: branches.len(),
                            message: e.to_string(),
                        },
                    );
                    first_error.get_or_insert(e);
                }
            }
        }
        if branches.is_empty() {
            return Err(first_error.unwrap_or(Error::EmptyQuestion));
        }
        let yes_votes = branches.iter().filter(|b| b.final_answer.answer).count();
        let no_votes = branches.len() - yes_votes;
        let answer = if yes_votes != no_votes {
            yes_votes > no_votes
        } else {
            let margin: f32 = branches
                .iter()
                .map(|b| b.final_answer.yes_logprob - b.final_answer.no_logprob)
                .sum();
            margin + self.config.answer_offset * branches.len() as f32 > 0.0
        };
        emit(
            &events,
            Event::Answer {
                answer,
                yes_votes,
                no_votes,
            },
        );
        Ok(Trace {
            version: 1,
            question: question.to_string(),
            answer,
            yes_votes,
            no_votes,
            branches,
            tokens,
            model: self.model.describe(),
            retriever: self.retriever.as_ref().map_or("none".into(), |r| r.name()),
            prompt_version: prompts::PROMPT_VERSION.into(),
            config: TraceConfig {
                max_steps: self.config.max_steps,
                explore: self.config.explore,
                pre_answer: self.config.pre_answer,
                retrieval: self.config.retrieval,
                passages: self.config.passages,
            },
            seconds: start.elapsed().as_secs_f64(),
            answer_offset: self.config.answer_offset,
            calibration: self.config.calibration.clone(),
        })
    }
}

fn emit(events: &Option<UnboundedSender<Event>>, event: Event) {
    if let Some(tx) = events {
        let _ = tx.send(event);
    }
}

/// FNV-1a, 64 bits: a hash that stays the same across builds (for cache file names).
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
