//! The ways of answering a question, all on the same model and retriever and all deciding
//! yes/no the same way: by comparing log p(" yes") and log p(" no") after `Answer:`.
//!
//! - **direct**: the question, then the answer.
//! - **cot**: the question, the model's step-by-step reasoning, then the answer.
//! - **rag**: the top-10 passages for the question, the question, then the answer.
//! - **self-ask** (Press et al. 2023): follow-up questions, each answered from retrieved
//!   passages, then the answer.
//! - **ircot** (Trivedi et al. 2023): chain-of-thought sentences interleaved with retrieval
//!   (each sentence is the next query), then the answer.
//! - **geek**: the excavation agent.
//!
//! Every prompt piece the agent also uses (line grammars, passage lines, the scored
//! continuations) comes from [`geek_agent::prompts`].

use std::sync::Arc;

use geek_agent::prompts::{self, ANSWER_PREFIX, LINE_GRAMMAR, NO, SUB_QUESTION_GRAMMAR, YES};
use geek_agent::{AgentModel, AgentSequence, AnswerSource, Excavator, TokenCounts, Trace};
use geek_backend::{GenerateParams, Sampling, StopReason};
use geek_retriever::{Passage, Retriever};
use serde::{Deserialize, Serialize};

/// Version of the baseline prompts below (the agent's are `geek_agent::prompts::PROMPT_VERSION`).
pub const BASELINE_PROMPT_VERSION: &str = "geek-baselines-v2";

const DIRECT_SYSTEM: &str = "Answer the yes/no question with yes or no.";
const COT_SYSTEM: &str =
    "Answer the yes/no question. Think step by step in a few sentences, then answer yes or no.";
const RAG_SYSTEM: &str =
    "Answer the yes/no question with yes or no, using the passages if they help.";
const SELF_ASK_SYSTEM: &str = "Answer the yes/no question. If it needs facts you must look up, \
ask follow-up questions one at a time; each is answered from Wikipedia passages. Then give the \
final answer.

Example:
Question: Could a llama give birth twice during the Vietnam War?
Are follow up questions needed here: Yes.
Follow up: How long is the gestation period of a llama?
Passages:
[P1] Llama: The gestation period of a llama is 11.5 months (350 days).
Intermediate answer: About 11.5 months.
Follow up: How long did the Vietnam War last?
Passages:
[P1] Vietnam War: The war lasted from 1 November 1955 to 30 April 1975.
Intermediate answer: About 20 years, from 1955 to 1975.
So the final answer is: yes";
const IRCOT_SYSTEM: &str = "Answer the yes/no question by reasoning over Wikipedia passages. \
Write one sentence of reasoning at a time; after each sentence more passages are retrieved for \
it. When you can decide, write a sentence that ends with \"so the answer is yes\" or \"so the \
answer is no\".";
const REASONING: &str = "Reasoning:";
const FOLLOW_UP_NEEDED: &str = "Are follow up questions needed here:";
const FOLLOW_UP: &str = "Follow up:";
const INTERMEDIATE: &str = "Intermediate answer:";
const SO_FINAL: &str = "So the final answer is:";
const THOUGHT: &str = "Thought:";
/// Passages given to the rag baseline.
pub const RAG_PASSAGES: usize = 10;
/// Follow-up questions (self-ask) or reasoning sentences (ircot) before the answer is forced.
pub const MAX_HOPS: usize = 4;
/// Passages shown per follow-up (self-ask) and per retrieval (ircot).
const HOP_PASSAGES: usize = 3;

/// Which method answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Question → answer.
    Direct,
    /// Question → reasoning → answer.
    Cot,
    /// Passages + question → answer.
    Rag,
    /// Follow-up questions answered by retrieval → answer.
    SelfAsk,
    /// Reasoning sentences interleaved with retrieval → answer.
    Ircot,
    /// The excavation agent.
    Geek,
}

impl Method {
    /// Every method, in the order reports list them.
    pub const ALL: [Method; 6] = [
        Method::Direct,
        Method::Cot,
        Method::Rag,
        Method::SelfAsk,
        Method::Ircot,
        Method::Geek,
    ];

    /// The name used in file names and flags.
    pub fn name(self) -> &'static str {
        match self {
            Method::Direct => "direct",
            Method::Cot => "cot",
            Method::Rag => "rag",
            Method::SelfAsk => "self-ask",
            Method::Ircot => "ircot",
            Method::Geek => "geek",
        }
    }

    /// Whether the method reads retrieved passages.
    pub fn retrieves(self) -> bool {
        matches!(
            self,
            Method::Rag | Method::SelfAsk | Method::Ircot | Method::Geek
        )
    }

    /// The version of every prompt the method uses.
    pub fn prompt_version(self) -> &'static str {
        match self {
            Method::Geek => prompts::PROMPT_VERSION,
            _ => BASELINE_PROMPT_VERSION,
        }
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Method {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Method::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Method::ALL.iter().map(|m| m.name()).collect();
                format!("method must be one of {}, not {s:?}", names.join(", "))
            })
    }
}

/// One method's answer to one question.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MethodAnswer {
    /// The prediction (the voted answer for geek).
    pub prediction: bool,
    /// log p(" yes") (geek: mean over branches).
    pub yes_logprob: f32,
    /// log p(" no") (geek: mean over branches).
    pub no_logprob: f32,
    /// Passage ids retrieved, in retrieval order, without repeats.
    pub retrieved: Vec<String>,
    /// The text the model wrote before answering (cot, self-ask, ircot).
    pub reasoning: Option<String>,
    /// Tokens decoded for this question.
    pub tokens_decoded: usize,
    /// Tokens a stateless API would have decoded.
    pub tokens_without_reuse: usize,
    /// The agent's trace (geek).
    pub trace: Option<Trace>,
}

/// What a method needs.
#[derive(Clone)]
pub struct Answerer {
    /// The model.
    pub model: Arc<dyn AgentModel>,
    /// The retriever (rag, self-ask, ircot, geek).
    pub retriever: Option<Arc<dyn Retriever>>,
    /// The agent (geek).
    pub agent: Option<Arc<Excavator>>,
}

/// A baseline's running transcript: one sequence and its token accounting.
struct Transcript {
    seq: Box<dyn AgentSequence>,
    counts: TokenCounts,
    retrieved: Vec<String>,
    written: Vec<String>,
}

impl Transcript {
    async fn start(model: &dyn AgentModel, system: &str, user: &str) -> crate::Result<Self> {
        let prompt = model.chat_prompt(system, user).await?;
        // A baseline's transcript is one answer.
        let seq = model.answer_sequence().await?;
        let mut counts = TokenCounts::default();
        counts.add_prefill(&seq.append_parts(&prompt).await?);
        Ok(Transcript {
            seq,
            counts,
            retrieved: Vec::new(),
            written: Vec::new(),
        })
    }

    async fn append(&mut self, text: &str) -> crate::Result<()> {
        let stats = self.seq.append(text).await?;
        self.counts.add_prefill(&stats);
        Ok(())
    }

    /// One generated line under `grammar`, returned without its newline; a line cut by
    /// `max_tokens` is closed so the transcript stays one line per item.
    async fn line(&mut self, grammar: &str, max_tokens: usize) -> crate::Result<String> {
        let params = GenerateParams {
            max_tokens,
            sampling: Sampling::greedy(),
            stop: vec!["\n".into()],
            grammar: Some(grammar.to_string()),
            ignore_eos: false,
            logprobs: 0,
        };
        let done = self.seq.generate(params, &mut |_| {}).await?;
        self.counts.add_generation(&done);
        if done.stop == StopReason::MaxTokens {
            self.append("\n").await?;
        }
        let text = done.text.trim().to_string();
        self.written.push(text.clone());
        Ok(text)
    }

    async fn score(&self, candidates: &[&str]) -> crate::Result<Vec<f32>> {
        Ok(self.seq.score(candidates).await?)
    }

    /// Passage lines for `passages`, numbered from `first`; their ids are recorded.
    fn show(&mut self, passages: &[Passage], first: usize) -> String {
        let shown: Vec<(String, String)> = passages
            .iter()
            .map(|p| (p.title.clone(), prompts::passage_excerpt(&p.text)))
            .collect();
        for p in passages {
            if !self.retrieved.contains(&p.id) {
                self.retrieved.push(p.id.clone());
            }
        }
        prompts::passage_lines(&shown, first)
    }

    /// Appends `Answer:` and scores yes/no.
    async fn answer(mut self, prefix: &str) -> crate::Result<MethodAnswer> {
        self.append(prefix).await?;
        let scores = self.score(&[YES, NO]).await?;
        Ok(MethodAnswer {
            prediction: scores[0] > scores[1],
            yes_logprob: scores[0],
            no_logprob: scores[1],
            retrieved: self.retrieved,
            reasoning: (!self.written.is_empty()).then(|| self.written.join("\n")),
            tokens_decoded: self.counts.decoded,
            tokens_without_reuse: self.counts.without_reuse,
            trace: None,
        })
    }
}

impl Answerer {
    /// Answers `question` with `method`.
    pub async fn answer(&self, method: Method, question: &str) -> crate::Result<MethodAnswer> {
        match method {
            Method::Direct => self.direct(question).await,
            Method::Cot => self.cot(question).await,
            Method::Rag => self.rag(question).await,
            Method::SelfAsk => self.self_ask(question).await,
            Method::Ircot => self.ircot(question).await,
            Method::Geek => self.geek(question).await,
        }
    }

    /// The margins `log p(yes) − log p(no)` the method gives content-free inputs (contextual
    /// calibration). The agent scores its final answer after a content-free question and
    /// summary instead of excavating them.
    pub async fn content_free_margins(&self, method: Method) -> crate::Result<Vec<f32>> {
        let mut margins = Vec::new();
        for input in crate::calibration::CONTENT_FREE {
            let margin = match method {
                Method::Geek => self.agent()?.content_free_margin(input).await?,
                _ => {
                    let a = self.answer(method, input).await?;
                    a.yes_logprob - a.no_logprob
                }
            };
            margins.push(margin);
        }
        Ok(margins)
    }

    fn agent(&self) -> crate::Result<&Excavator> {
        self.agent
            .as_deref()
            .ok_or_else(|| crate::Error::Config("geek needs an agent".into()))
    }

    fn retriever(&self, method: Method) -> crate::Result<&dyn Retriever> {
        self.retriever
            .as_deref()
            .ok_or_else(|| crate::Error::Config(format!("{method} needs a retriever")))
    }

    async fn geek(&self, question: &str) -> crate::Result<MethodAnswer> {
        let trace = self.agent()?.run(question).await?;
        let mut retrieved = Vec::new();
        for step in trace.branches.iter().flat_map(|b| &b.steps) {
            if let Some(AnswerSource::Retrieved { passages, .. }) = &step.source {
                for p in passages {
                    if !retrieved.contains(&p.id) {
                        retrieved.push(p.id.clone());
                    }
                }
            }
        }
        let n = trace.branches.len() as f32;
        let mean = |f: fn(&geek_agent::FinalAnswer) -> f32| {
            trace
                .branches
                .iter()
                .map(|b| f(&b.final_answer))
                .sum::<f32>()
                / n
        };
        Ok(MethodAnswer {
            prediction: trace.answer,
            yes_logprob: mean(|f| f.yes_logprob),
            no_logprob: mean(|f| f.no_logprob),
            retrieved,
            reasoning: None,
            tokens_decoded: trace.tokens.decoded,
            tokens_without_reuse: trace.tokens.without_reuse,
            trace: Some(trace),
        })
    }

    async fn direct(&self, question: &str) -> crate::Result<MethodAnswer> {
        let t = Transcript::start(&*self.model, DIRECT_SYSTEM, &prompts::user(question)).await?;
        t.answer(ANSWER_PREFIX).await
    }

    async fn cot(&self, question: &str) -> crate::Result<MethodAnswer> {
        let mut t = Transcript::start(&*self.model, COT_SYSTEM, &prompts::user(question)).await?;
        t.append(REASONING).await?;
        t.line(LINE_GRAMMAR, 128).await?;
        t.answer(ANSWER_PREFIX).await
    }

    async fn rag(&self, question: &str) -> crate::Result<MethodAnswer> {
        let passages = self
            .retriever(Method::Rag)?
            .retrieve(question, RAG_PASSAGES)
            .await?;
        // The passages go in the user turn, before the question: retrieved text is content.
        let shown: Vec<(String, String)> = passages
            .iter()
            .map(|p| (p.title.clone(), prompts::passage_excerpt(&p.text)))
            .collect();
        let user = format!(
            "{}{}",
            prompts::passage_lines(&shown, 1),
            prompts::user(question)
        );
        let mut t = Transcript::start(&*self.model, RAG_SYSTEM, &user).await?;
        t.retrieved = passages.iter().map(|p| p.id.clone()).collect();
        t.answer(ANSWER_PREFIX).await
    }

    async fn self_ask(&self, question: &str) -> crate::Result<MethodAnswer> {
        let retriever = self.retriever(Method::SelfAsk)?;
        let mut t =
            Transcript::start(&*self.model, SELF_ASK_SYSTEM, &prompts::user(question)).await?;
        t.append(FOLLOW_UP_NEEDED).await?;
        let needed = t.score(&[" Yes", " No"]).await?;
        if needed[0] <= needed[1] {
            t.append(" No.\n").await?;
            return t.answer(SO_FINAL).await;
        }
        t.append(" Yes.\n").await?;
        for hop in 0..MAX_HOPS {
            if hop > 0 {
                // First tokens of the two ways on: another follow-up, or the answer.
                let next = t.score(&["Follow", "So"]).await?;
                if next[1] > next[0] {
                    break;
                }
            }
            t.append(FOLLOW_UP).await?;
            let follow_up = t.line(SUB_QUESTION_GRAMMAR, 48).await?;
            let passages = retriever.retrieve(&follow_up, HOP_PASSAGES).await?;
            let lines = t.show(&passages, 1);
            t.append(&format!("{lines}{INTERMEDIATE}")).await?;
            t.line(LINE_GRAMMAR, 48).await?;
        }
        t.answer(SO_FINAL).await
    }

    async fn ircot(&self, question: &str) -> crate::Result<MethodAnswer> {
        let retriever = self.retriever(Method::Ircot)?;
        let mut t = Transcript::start(&*self.model, IRCOT_SYSTEM, &prompts::user(question)).await?;
        let first = retriever.retrieve(question, HOP_PASSAGES).await?;
        let lines = t.show(&first, 1);
        t.append(&lines).await?;
        for hop in 0..MAX_HOPS {
            t.append(THOUGHT).await?;
            let thought = t.line(LINE_GRAMMAR, 48).await?;
            if thought.to_lowercase().contains("answer is") || hop + 1 == MAX_HOPS {
                break;
            }
            let found = retriever.retrieve(&thought, HOP_PASSAGES + 2).await?;
            let new: Vec<Passage> = found
                .into_iter()
                .filter(|p| !t.retrieved.contains(&p.id))
                .take(2)
                .collect();
            if !new.is_empty() {
                let first = t.retrieved.len() + 1;
                let lines = t.show(&new, first);
                t.append(&lines).await?;
            }
        }
        t.answer(ANSWER_PREFIX).await
    }
}
