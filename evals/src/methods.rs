//! The four ways of answering a question, all on the same model and all deciding yes/no the
//! same way: by comparing log p(" yes") and log p(" no") after `Answer:`.
//!
//! - **direct**: the question, then the answer.
//! - **cot**: the question, the model's step-by-step reasoning, then the answer.
//! - **rag**: the top-10 passages for the question, the question, then the answer.
//! - **geek**: the excavation agent.

use std::sync::Arc;

use geek_agent::{AgentModel, AnswerSource, Excavator, Trace};
use geek_backend::{GenerateParams, Sampling};
use geek_retriever::Retriever;
use serde::{Deserialize, Serialize};

/// Version of the baseline prompts below (the agent's are `geek_agent::prompts::PROMPT_VERSION`).
pub const BASELINE_PROMPT_VERSION: &str = "geek-baselines-v1";

const DIRECT_SYSTEM: &str = "Answer the yes/no question with yes or no.";
const COT_SYSTEM: &str =
    "Answer the yes/no question. Think step by step in a few sentences, then answer yes or no.";
const RAG_SYSTEM: &str =
    "Answer the yes/no question with yes or no, using the passages if they help.";
const ANSWER: &str = "Answer:";
const REASONING: &str = "Reasoning:";
/// Passages given to the rag baseline.
pub const RAG_PASSAGES: usize = 10;
const RAG_WORDS: usize = 50;

/// Which method answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Question → answer.
    Direct,
    /// Question → reasoning → answer.
    Cot,
    /// Passages + question → answer.
    Rag,
    /// The excavation agent.
    Geek,
}

impl Method {
    /// The name used in file names and flags.
    pub fn name(self) -> &'static str {
        match self {
            Method::Direct => "direct",
            Method::Cot => "cot",
            Method::Rag => "rag",
            Method::Geek => "geek",
        }
    }
}

impl std::str::FromStr for Method {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "direct" => Ok(Method::Direct),
            "cot" => Ok(Method::Cot),
            "rag" => Ok(Method::Rag),
            "geek" => Ok(Method::Geek),
            other => Err(format!(
                "method must be direct, cot, rag or geek, not {other:?}"
            )),
        }
    }
}

/// One method's answer to one question.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MethodAnswer {
    /// `yes_logprob > no_logprob` (the voted answer for geek).
    pub prediction: bool,
    /// log p(" yes").
    pub yes_logprob: f32,
    /// log p(" no").
    pub no_logprob: f32,
    /// Passage ids retrieved, in retrieval order, without repeats.
    pub retrieved: Vec<String>,
    /// The chain-of-thought text (cot).
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
    /// The retriever (rag, geek).
    pub retriever: Option<Arc<dyn Retriever>>,
    /// The agent (geek).
    pub agent: Option<Arc<Excavator>>,
}

impl Answerer {
    /// Answers `question` with `method`.
    pub async fn answer(&self, method: Method, question: &str) -> crate::Result<MethodAnswer> {
        match method {
            Method::Geek => {
                let agent = self
                    .agent
                    .as_ref()
                    .ok_or_else(|| crate::Error::Config("geek needs an agent".into()))?;
                let trace = agent.run(question).await?;
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
                let main = &trace.main_branch().final_answer;
                Ok(MethodAnswer {
                    prediction: trace.answer,
                    yes_logprob: main.yes_logprob,
                    no_logprob: main.no_logprob,
                    retrieved,
                    reasoning: None,
                    tokens_decoded: trace.tokens.decoded,
                    tokens_without_reuse: trace.tokens.without_reuse,
                    trace: Some(trace),
                })
            }
            _ => self.baseline(method, question).await,
        }
    }

    async fn baseline(&self, method: Method, question: &str) -> crate::Result<MethodAnswer> {
        let mut retrieved = Vec::new();
        let (system, user) = match method {
            Method::Direct | Method::Cot => (
                if method == Method::Direct {
                    DIRECT_SYSTEM
                } else {
                    COT_SYSTEM
                },
                format!("Question: {}", question.trim()),
            ),
            _ => {
                let retriever = self
                    .retriever
                    .as_ref()
                    .ok_or_else(|| crate::Error::Config("rag needs a retriever".into()))?;
                let passages = retriever.retrieve(question, RAG_PASSAGES).await?;
                let mut user = String::from("Passages:\n");
                for (i, p) in passages.iter().enumerate() {
                    let words: Vec<&str> = p.text.split_whitespace().take(RAG_WORDS).collect();
                    user.push_str(&format!("[P{}] {}: {}\n", i + 1, p.title, words.join(" ")));
                    retrieved.push(p.id.clone());
                }
                user.push_str(&format!("Question: {}", question.trim()));
                (RAG_SYSTEM, user)
            }
        };
        let prompt = self.model.chat_prompt(system, &user).await?;
        let seq = self.model.sequence()?;
        let stats = seq.append_parts(&prompt).await?;
        let (mut decoded, mut without_reuse) = (stats.decoded, stats.total);
        let mut reasoning = None;
        if method == Method::Cot {
            let s = seq.append(REASONING).await?;
            decoded += s.decoded;
            without_reuse += s.total;
            let params = GenerateParams {
                max_tokens: 128,
                sampling: Sampling::greedy(),
                stop: vec!["\n".into()],
                grammar: Some("root ::= \" \" [^\\n]+ \"\\n\"\n".into()),
                ignore_eos: false,
            };
            let done = seq.generate(params, &mut |_| {}).await?;
            decoded += done.prefill.decoded + done.tokens.len().saturating_sub(1);
            without_reuse += done.prefill.total + done.tokens.len();
            reasoning = Some(done.text.trim().to_string());
            // The newline that ended the line is in the sequence, unless the line was cut.
            let close = if done.stop == geek_backend::StopReason::MaxTokens {
                "\n"
            } else {
                ""
            };
            let s = seq.append(&format!("{close}{ANSWER}")).await?;
            decoded += s.decoded;
            without_reuse += s.total;
        } else {
            let s = seq.append(ANSWER).await?;
            decoded += s.decoded;
            without_reuse += s.total;
        }
        let scores = seq.score(&[" yes", " no"]).await?;
        Ok(MethodAnswer {
            prediction: scores[0] > scores[1],
            yes_logprob: scores[0],
            no_logprob: scores[1],
            retrieved,
            reasoning,
            tokens_decoded: decoded,
            tokens_without_reuse: without_reuse,
            trace: None,
        })
    }
}
