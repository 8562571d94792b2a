//! The excavation loop.

use std::sync::Arc;
use std::time::Instant;

use geek_backend::{Completion, GenerateParams, PromptPart, Sampling, StopReason};
use geek_retriever::Retriever;
use tokio::sync::mpsc::UnboundedSender;

use crate::demos::DemoBank;
use crate::model::{AgentModel, AgentSequence};
use crate::prompts;
use crate::trace::{
    Action, ActionRecord, ActionTiming, AnswerSource, Branch, Event, FinalAnswer, PassageRef, Step,
    TokenCounts, Trace, TraceConfig,
};
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
            prefix_cache: None,
            answer_offset: 0.0,
            calibration: None,
        }
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
        if config.max_steps == 0 || config.explore == 0 {
            return Err(Error::Config(
                "max_steps and explore must be at least 1".into(),
            ));
        }
        if config.explore > 16 {
            return Err(Error::Config("explore is at most 16".into()));
        }
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
            prefix: tokio::sync::Mutex::new(None),
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
    prefix: tokio::sync::Mutex<Option<CachedPrefix>>,
}

impl Excavator {
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
        let (_, scores, _, _) = final_answer(&*self.model, input, &facts, &mut |_| {}).await?;
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
            BranchRun {
                ex: self,
                id,
                question: question.to_string(),
                seq,
                len: question_len,
                counts: TokenCounts::default(),
                steps: Vec::new(),
                actions: Vec::new(),
                events: events.clone(),
                sample_next_sub_question: first_seed,
                timing: ActionTiming::default(),
                action_started: Instant::now(),
            }
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

/// One branch of an excavation, from the question to its final answer.
struct BranchRun<'a> {
    ex: &'a Excavator,
    id: usize,
    /// The question asked.
    question: String,
    seq: Box<dyn AgentSequence>,
    /// Tokens in `seq`.
    len: usize,
    counts: TokenCounts,
    steps: Vec<Step>,
    actions: Vec<ActionRecord>,
    events: Option<UnboundedSender<Event>>,
    /// Seed for sampling the next sub-question instead of decoding greedily.
    sample_next_sub_question: Option<u32>,
    /// The current action's timing so far.
    timing: ActionTiming,
    /// When the current action started.
    action_started: Instant,
}

impl BranchRun<'_> {
    /// Runs to the final answer; returns the branch, its token counts and final length.
    async fn run(mut self) -> Result<(Branch, TokenCounts, usize)> {
        let config = &self.ex.config;
        let n_ctx = config
            .context_limit
            .unwrap_or_else(|| self.ex.model.context_size())
            .min(self.ex.model.context_size());
        loop {
            let forced = if self.actions.len() >= config.max_steps {
                Some(format!("step budget of {} reached", config.max_steps))
            } else if self.len + CONTEXT_RESERVE > n_ctx {
                Some(format!(
                    "context nearly full ({} of {n_ctx} tokens)",
                    self.len
                ))
            } else {
                None
            };
            if let Some(reason) = forced {
                return self.finish(Some(reason)).await;
            }
            let before_action = self.len;
            self.append(prompts::ACTION_PREFIX).await?;
            let action = self.choose_action().await?;
            self.emit(Event::StepStarted {
                branch: self.id,
                step: self.actions.len() + 1,
                action,
            });
            match action {
                Action::AddDecomp => {
                    if let Some(note) = self.add_decomp().await? {
                        // A repeated sub-question: undo it, count it, sample the retry. Its
                        // tokens were decoded once and dropped: unique, not reused.
                        self.counts.unique += self.len - before_action;
                        self.seq.truncate(before_action).await?;
                        self.len = before_action;
                        self.record(action, Some(note));
                        self.sample_next_sub_question = Some(1000 + self.actions.len() as u32);
                        continue;
                    }
                }
                Action::Retrieve => self.retrieve_and_extract().await?,
                Action::SelfAnswer => self.self_answer().await?,
                Action::FinalAnswer => {
                    self.record(action, None);
                    return self.finish(None).await;
                }
            }
            self.record(action, None);
        }
    }

    /// Records an action with the time it took since the last one.
    fn record(&mut self, action: Action, note: Option<String>) {
        let mut timing = std::mem::take(&mut self.timing);
        timing.seconds = self.action_started.elapsed().as_secs_f64();
        self.action_started = Instant::now();
        self.actions.push(ActionRecord {
            action,
            note,
            timing,
        });
    }

    fn emit(&self, event: Event) {
        emit(&self.events, event);
    }

    fn allowed_actions(&self) -> Vec<Action> {
        let open = self.steps.last().is_some_and(|s| s.answer.is_none());
        match (open, self.ex.config.retrieval) {
            (true, true) => vec![Action::Retrieve, Action::SelfAnswer],
            (true, false) => vec![Action::SelfAnswer],
            (false, _) => vec![Action::AddDecomp, Action::FinalAnswer],
        }
    }

    async fn append(&mut self, text: &str) -> Result<()> {
        let started = Instant::now();
        let stats = self.seq.append(text).await?;
        self.counts.add_prefill(&stats);
        self.timing
            .add_prefill(&stats, started.elapsed().as_secs_f64());
        self.len = stats.total;
        Ok(())
    }

    /// Generates one line under `grammar`; the newline stays in the sequence, the returned
    /// text has no leading space and no newline. A line cut by `max_tokens` is closed with
    /// `closing` so the transcript stays well-formed.
    async fn line(
        &mut self,
        grammar: &str,
        max_tokens: usize,
        sampling: Sampling,
        closing: &str,
    ) -> Result<String> {
        let params = GenerateParams {
            max_tokens,
            sampling,
            stop: vec!["\n".into()],
            grammar: Some(grammar.to_string()),
            ignore_eos: false,
        };
        let (id, events) = (self.id, self.events.clone());
        let mut on_piece = move |p: &str| {
            emit(
                &events,
                Event::TokenStream {
                    branch: id,
                    text: p.to_string(),
                },
            )
        };
        let done: Completion = self.seq.generate(params, &mut on_piece).await?;
        self.counts.add_generation(&done);
        self.timing.add_generation(&done);
        self.len = done.prefill.total + done.tokens.len();
        let mut text = done.text.trim().to_string();
        if done.stop == StopReason::MaxTokens {
            let close = closing.trim_end_matches('\n');
            text.push_str(close);
            self.append(&format!("{close}\n")).await?;
        }
        Ok(text)
    }

    async fn choose_action(&mut self) -> Result<Action> {
        let allowed = self.allowed_actions();
        let text = self
            .line(
                &prompts::action_grammar(&allowed),
                8,
                Sampling::greedy(),
                "",
            )
            .await?;
        Action::from_keyword(&text)
            .filter(|a| allowed.contains(a))
            .ok_or(Error::BadOutput {
                what: "action".into(),
                output: text,
            })
    }

    /// Writes the next sub-question; `Some(reason)` when it must be rejected.
    async fn add_decomp(&mut self) -> Result<Option<String>> {
        let k = self.steps.len() + 1;
        let sampling = match self.sample_next_sub_question.take() {
            Some(seed) => Sampling::seeded(self.ex.config.explore_temperature, seed),
            None => Sampling::greedy(),
        };
        let (sub_question, hint) = if self.ex.config.pre_answer {
            let (q, guess) = self.draft_plan(sampling).await?;
            self.append(&format!("{} {q}\n", prompts::sub_question_prefix(k)))
                .await?;
            (q, guess)
        } else {
            self.append(&prompts::sub_question_prefix(k)).await?;
            let q = self
                .line(prompts::SUB_QUESTION_GRAMMAR, 48, sampling, "?")
                .await?;
            (q, None)
        };
        let normal = |s: &str| {
            s.to_lowercase()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        if self
            .steps
            .iter()
            .any(|s| normal(&s.sub_question) == normal(&sub_question))
        {
            return Ok(Some(format!(
                "repeated sub-question rejected: {sub_question}"
            )));
        }
        self.emit(Event::SubQuestion {
            branch: self.id,
            text: sub_question.clone(),
        });
        self.steps.push(Step {
            sub_question,
            hint,
            answer: None,
            source: None,
        });
        Ok(None)
    }

    /// Pre-answer: on a throw-away fork, drafts the remaining sub-questions with guessed
    /// answers; returns the first sub-question and its guess.
    async fn draft_plan(&mut self, sampling: Sampling) -> Result<(String, Option<String>)> {
        let fork = self.seq.fork().await?;
        let stats = fork.append(prompts::PLAN_PREFIX).await?;
        self.counts.add_prefill(&stats);
        let params = GenerateParams {
            max_tokens: 160,
            sampling,
            stop: vec!["End\n".into()],
            grammar: Some(prompts::PLAN_GRAMMAR.into()),
            ignore_eos: false,
        };
        let done = fork.generate(params, &mut |_| {}).await?;
        let generated = done.tokens.len();
        self.counts.add_generation(&done);
        // The fork's own tokens were decoded once and then dropped: unique, not reused.
        self.counts.unique += stats.total - self.len + generated;
        let first = done.text.lines().next().unwrap_or_default();
        let rest = first.split_once(": ").map_or(first, |(_, r)| r);
        let (q, guess) = match rest.split_once("? Guess: ") {
            Some((q, g)) => (format!("{}?", q.trim()), Some(g.trim().to_string())),
            None if !rest.trim().is_empty() => (rest.trim().to_string(), None),
            None => {
                return Err(Error::BadOutput {
                    what: "pre-answer plan".into(),
                    output: done.text,
                })
            }
        };
        Ok((q, guess))
    }

    /// `#k` in a sub-question replaced by the k-th answer.
    fn resolve_refs(&self, text: &str) -> String {
        let mut out = text.to_string();
        for (i, step) in self.steps.iter().enumerate().rev() {
            if let Some(answer) = &step.answer {
                out = out.replace(&format!("#{}", i + 1), answer);
            }
        }
        out
    }

    async fn retrieve_and_extract(&mut self) -> Result<()> {
        let k = self.steps.len();
        let step = self.steps.last().expect("Retrieve follows a sub-question");
        let mut query = self.resolve_refs(&step.sub_question);
        if let Some(hint) = &step.hint {
            query.push(' ');
            query.push_str(hint);
        }
        let retriever = self
            .ex
            .retriever
            .as_ref()
            .expect("retrieval needs a retriever");
        let retrieval_started = Instant::now();
        let retrieved = retriever.retrieve(&query, self.ex.config.passages).await;
        self.timing.retrieval_seconds += retrieval_started.elapsed().as_secs_f64();
        let (passages, error) = match retrieved {
            Ok(p) => (p, None),
            Err(e) => {
                self.emit(Event::Error {
                    branch: self.id,
                    message: format!("retrieval failed: {e}"),
                });
                (Vec::new(), Some(e.to_string()))
            }
        };
        let refs: Vec<PassageRef> = passages
            .iter()
            .map(|p| PassageRef {
                id: p.id.clone(),
                title: p.title.clone(),
                score: p.score,
            })
            .collect();
        self.emit(Event::Retrieved {
            branch: self.id,
            query: query.clone(),
            passages: refs.clone(),
        });
        let shown: Vec<(String, String)> = passages
            .iter()
            .map(|p| {
                (
                    p.title.clone(),
                    prompts::passage_excerpt_for(&p.text, &query),
                )
            })
            .collect();
        self.append(&prompts::passages_block(&shown, k)).await?;
        let before_fact = self.len;
        let text = self
            .line(
                &prompts::cited_fact_grammar(shown.len()),
                64,
                Sampling::greedy(),
                "",
            )
            .await?;
        let (fact, cited) = split_citations(&text, &refs);
        let unsupported = self.unsupported(&fact, &cited, &refs, &shown);
        if unsupported.is_some() && fact != prompts::NO_ANSWER {
            // The fact says what its passages do not: the transcript shows that no passage
            // answered, as the worked example does.
            self.counts.unique += self.len - before_fact;
            self.seq.truncate(before_fact).await?;
            self.len = before_fact;
            self.append(&format!(" {}\n", prompts::NO_ANSWER)).await?;
        }
        let step = self.steps.last_mut().expect("checked above");
        step.source = Some(AnswerSource::Retrieved {
            query,
            passages: refs,
            cited: if unsupported.is_some() {
                vec![]
            } else {
                cited.clone()
            },
            error,
            unsupported: unsupported.clone(),
        });
        if unsupported.is_some() {
            self.append(&format!(
                "{}{}",
                prompts::ACTION_PREFIX,
                prompts::action_line(Action::SelfAnswer)
            ))
            .await?;
            return self.answer_self(k).await;
        }
        self.emit(Event::FactExtracted {
            branch: self.id,
            fact: fact.clone(),
            citations: cited,
        });
        let step = self.steps.last_mut().expect("checked above");
        step.answer = Some(fact);
        Ok(())
    }

    /// Why a retrieved fact is not kept: the extractor found no answer, or the fact's words
    /// are mostly absent from the passages it cites.
    fn unsupported(
        &self,
        fact: &str,
        cited: &[String],
        refs: &[PassageRef],
        shown: &[(String, String)],
    ) -> Option<String> {
        if fact == prompts::NO_ANSWER || refs.is_empty() {
            return Some(prompts::NO_ANSWER.to_string());
        }
        let texts: Vec<String> = refs
            .iter()
            .zip(shown)
            .filter(|(r, _)| cited.contains(&r.id))
            .map(|(_, (title, text))| format!("{title} {text}"))
            .collect();
        let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
        let support = prompts::support(fact, &texts);
        (support < self.ex.config.min_support).then(|| {
            format!(
                "unsupported ({:.0}% of its words cited): {fact}",
                support * 100.0
            )
        })
    }

    /// Answers the open sub-question `k` with the model's own knowledge (the fact line).
    async fn answer_self(&mut self, k: usize) -> Result<()> {
        self.append(&prompts::fact_prefix(k)).await?;
        let fact = self
            .line(prompts::LINE_GRAMMAR, 40, Sampling::greedy(), "")
            .await?;
        self.emit(Event::FactExtracted {
            branch: self.id,
            fact: fact.clone(),
            citations: vec![],
        });
        let step = self.steps.last_mut().expect("a sub-question is open");
        step.answer = Some(fact);
        Ok(())
    }

    async fn self_answer(&mut self) -> Result<()> {
        let k = self.steps.len();
        self.answer_self(k).await?;
        let step = self
            .steps
            .last_mut()
            .expect("SelfAnswer follows a sub-question");
        step.source = Some(AnswerSource::Model);
        Ok(())
    }

    async fn finish(mut self, forced: Option<String>) -> Result<(Branch, TokenCounts, usize)> {
        if let Some(reason) = &forced {
            self.append(&format!(
                "{}{}",
                prompts::ACTION_PREFIX,
                prompts::action_line(Action::FinalAnswer)
            ))
            .await?;
            self.record(Action::FinalAnswer, Some(reason.clone()));
        }
        let final_started = Instant::now();
        let (summary, scores) = self.final_answer().await?;
        let mut final_timing = std::mem::take(&mut self.timing);
        final_timing.seconds = final_started.elapsed().as_secs_f64();
        let final_answer = FinalAnswer {
            summary,
            answer: scores[0] - scores[1] + self.ex.config.answer_offset > 0.0,
            yes_logprob: scores[0],
            no_logprob: scores[1],
            forced: forced.is_some(),
        };
        self.emit(Event::BranchAnswered {
            branch: self.id,
            answer: final_answer.clone(),
        });
        let branch = Branch {
            id: self.id,
            steps: self.steps,
            actions: self.actions,
            final_answer,
            final_timing,
        };
        Ok((branch, self.counts, self.len))
    }
}

impl BranchRun<'_> {
    /// The reasoning and the yes/no scores of the final answer, in a short prompt of its own
    /// that holds the question and the facts found (not the passages).
    async fn final_answer(&mut self) -> Result<(String, Vec<f32>)> {
        let facts: Vec<(String, String)> = self
            .steps
            .iter()
            .filter_map(|s| Some((s.sub_question.clone(), s.answer.clone()?)))
            .collect();
        let (id, events) = (self.id, self.events.clone());
        let (reasoning, scores, counts, timing) =
            final_answer(&*self.ex.model, &self.question, &facts, &mut |p| {
                emit(
                    &events,
                    Event::TokenStream {
                        branch: id,
                        text: p.to_string(),
                    },
                )
            })
            .await?;
        self.counts.decoded += counts.decoded;
        self.counts.without_reuse += counts.without_reuse;
        self.counts.unique += counts.decoded;
        self.timing.add(&timing);
        Ok((reasoning, scores))
    }
}

/// The final answer of `question` from `facts`: the reasoning line, the scores of yes and no,
/// and the tokens and time it took.
async fn final_answer(
    model: &dyn AgentModel,
    question: &str,
    facts: &[(String, String)],
    on_piece: &mut (dyn FnMut(&str) + Send),
) -> Result<(String, Vec<f32>, TokenCounts, ActionTiming)> {
    let mut counts = TokenCounts::default();
    let mut timing = ActionTiming::default();
    let prompt = model
        .chat_prompt(prompts::FINAL_SYSTEM, &prompts::final_user(question, facts))
        .await?;
    let seq = model.sequence()?;
    let started = Instant::now();
    let stats = seq.append_parts(&prompt).await?;
    counts.add_prefill(&stats);
    timing.add_prefill(&stats, started.elapsed().as_secs_f64());
    counts.add_prefill(&seq.append(prompts::REASONING_PREFIX).await?);
    let params = GenerateParams {
        max_tokens: 64,
        sampling: Sampling::greedy(),
        stop: vec!["\n".into()],
        grammar: Some(prompts::LINE_GRAMMAR.into()),
        ignore_eos: false,
    };
    let done = seq.generate(params, on_piece).await?;
    counts.add_generation(&done);
    timing.add_generation(&done);
    let close = if done.stop == StopReason::MaxTokens {
        "\n"
    } else {
        ""
    };
    counts.add_prefill(
        &seq.append(&format!("{close}{}", prompts::ANSWER_PREFIX))
            .await?,
    );
    let started = Instant::now();
    let scores = seq.score(&[prompts::YES, prompts::NO]).await?;
    timing.prefill_seconds += started.elapsed().as_secs_f64();
    Ok((done.text.trim().to_string(), scores, counts, timing))
}

/// FNV-1a, 64 bits: a hash that stays the same across builds (for cache file names).
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Splits `fact [P1, P3]` into the fact and the cited passage ids.
fn split_citations(text: &str, passages: &[PassageRef]) -> (String, Vec<String>) {
    let Some(open) = text.rfind('[') else {
        return (text.trim().to_string(), Vec::new());
    };
    let inside = text[open + 1..].trim_end_matches(']');
    let cited: Vec<String> = inside
        .split(',')
        .filter_map(|r| r.trim().strip_prefix('P')?.parse::<usize>().ok())
        .filter_map(|n| passages.get(n.checked_sub(1)?).map(|p| p.id.clone()))
        .collect();
    if cited.is_empty() {
        return (text.trim().to_string(), cited);
    }
    (text[..open].trim().to_string(), cited)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn citations_map_to_shown_passages() {
        let refs = vec![
            PassageRef {
                id: "Llama-3".into(),
                title: "Llama".into(),
                score: 1.0,
            },
            PassageRef {
                id: "vital:Llama".into(),
                title: "Llama".into(),
                score: 0.5,
            },
        ];
        assert_eq!(
            split_citations("About 11.5 months. [P2, P1]", &refs),
            (
                "About 11.5 months.".into(),
                vec!["vital:Llama".into(), "Llama-3".into()]
            )
        );
        assert_eq!(
            split_citations("No sources here", &refs),
            ("No sources here".into(), vec![])
        );
        // A reference to a passage that was not shown is dropped.
        assert_eq!(split_citations("x [P7]", &refs).1, Vec::<String>::new());
    }
}
