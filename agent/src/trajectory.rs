//! Gold excavations rendered exactly as the agent writes them, as training examples.
//!
//! A model tuned on these sees, token for token, the transcript the [`crate::Excavator`] builds:
//! the same chat prompt, the same action lines, passage blocks, fact lines and final answer.

use serde::{Deserialize, Serialize};

use crate::prompts;
use crate::trace::Action;

/// How a gold sub-question is answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum GoldAnswer {
    /// Retrieve: the passages shown (title, text) and the fact, citing 1-based passage numbers.
    Retrieved {
        /// Passages in the order shown.
        passages: Vec<(String, String)>,
        /// The extracted fact, without citations.
        fact: String,
        /// Cited passage numbers (1-based), at least one when passages are shown.
        cited: Vec<usize>,
    },
    /// SelfAnswer: a fact the model states itself.
    SelfAnswered {
        /// The fact.
        fact: String,
    },
}

/// One gold step: a sub-question and its answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GoldStep {
    /// The sub-question (may refer to earlier answers as #1, #2).
    pub sub_question: String,
    /// How it is answered.
    pub answer: GoldAnswer,
}

/// A whole gold excavation of one question.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trajectory {
    /// The question.
    pub question: String,
    /// The steps in order.
    pub steps: Vec<GoldStep>,
    /// The one-line summary before the answer.
    pub summary: String,
    /// The yes/no answer.
    pub answer: bool,
}

/// A (prompt, completion) pair: the training format of `geek compress finetune`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingExample {
    /// Text the loss does not cover.
    pub prompt: String,
    /// Text the loss covers, but for its `context` spans.
    pub completion: String,
    /// Byte ranges of `completion` the agent writes itself rather than the model (line
    /// prefixes, passage blocks): context, not targets. Tokenized apart, as the agent appends
    /// them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub context: Vec<(usize, usize)>,
}

/// A completion built piece by piece: what the model writes, and what the agent writes
/// (recorded as context spans).
#[derive(Default)]
struct Transcript {
    text: String,
    context: Vec<(usize, usize)>,
}

impl Transcript {
    /// Text the agent appends itself.
    fn agent(&mut self, piece: &str) {
        let start = self.text.len();
        self.text.push_str(piece);
        match self.context.last_mut() {
            Some(last) if last.1 == start => last.1 = self.text.len(),
            _ => self.context.push((start, self.text.len())),
        }
    }

    /// Text the model generates.
    fn model(&mut self, piece: &str) {
        self.text.push_str(piece);
    }
}

impl Trajectory {
    /// The user turn the chat prompt must be built from
    /// (`chat_prompt(prompts::SYSTEM, &trajectory.user_turn())`).
    pub fn user_turn(&self) -> String {
        prompts::user(&self.question)
    }

    /// Renders the trajectory after `chat_prompt`, the model's chat-templated system and user
    /// turns (as [`crate::AgentModel::chat_prompt`] returns them).
    pub fn render(&self, chat_prompt: &str) -> TrainingExample {
        let mut out = Transcript::default();
        let action = |out: &mut Transcript, a: Action| {
            out.agent(prompts::ACTION_PREFIX);
            out.model(&prompts::action_line(a));
        };
        for (i, step) in self.steps.iter().enumerate() {
            let k = i + 1;
            action(&mut out, Action::AddDecomp);
            out.agent(&prompts::sub_question_prefix(k));
            out.model(&format!(" {}\n", one_line(&step.sub_question)));
            match &step.answer {
                GoldAnswer::Retrieved {
                    passages,
                    fact,
                    cited,
                } => {
                    action(&mut out, Action::Retrieve);
                    let shown: Vec<(String, String)> = passages
                        .iter()
                        .map(|(t, p)| {
                            (
                                t.clone(),
                                prompts::passage_excerpt_for(p, &step.sub_question),
                            )
                        })
                        .collect();
                    out.agent(&prompts::passages_block(&shown, k));
                    let mut line = format!(" {}", one_line(fact));
                    if !passages.is_empty() {
                        let refs: Vec<String> = cited.iter().map(|c| format!("P{c}")).collect();
                        line.push_str(&format!(" [{}]", refs.join(", ")));
                    }
                    line.push('\n');
                    out.model(&line);
                }
                GoldAnswer::SelfAnswered { fact } => {
                    action(&mut out, Action::SelfAnswer);
                    out.agent(&prompts::fact_prefix(k));
                    out.model(&format!(" {}\n", one_line(fact)));
                }
            }
        }
        action(&mut out, Action::FinalAnswer);
        out.agent(prompts::SUMMARY_PREFIX);
        out.model(&format!(" {}\n", one_line(&self.summary)));
        out.agent(prompts::ANSWER_PREFIX);
        out.model(if self.answer {
            prompts::YES
        } else {
            prompts::NO
        });
        TrainingExample {
            prompt: chat_prompt.to_string(),
            completion: out.text,
            context: out.context,
        }
    }
}

impl Trajectory {
    /// The (sub-question, fact) pairs the final answer reads, as the agent passes its own.
    pub fn facts(&self) -> Vec<(String, String)> {
        self.steps
            .iter()
            .map(|s| {
                let fact = match &s.answer {
                    GoldAnswer::Retrieved { fact, .. } | GoldAnswer::SelfAnswered { fact } => fact,
                };
                (s.sub_question.clone(), fact.clone())
            })
            .collect()
    }

    /// The user turn of the final answer's own prompt (its system message is
    /// [`prompts::FINAL_SYSTEM`]).
    pub fn final_user_turn(&self) -> String {
        prompts::final_user(&self.question, &self.facts())
    }

    /// The final answer as a training example: after `chat_prompt` (the model's chat of
    /// [`prompts::FINAL_SYSTEM`] and [`Self::final_user_turn`]) and the answer prefix, the
    /// yes/no word the agent scores — one target token, each example short.
    pub fn render_final_answer(&self, chat_prompt: &str) -> TrainingExample {
        TrainingExample {
            prompt: format!("{chat_prompt}{}", prompts::ANSWER_PREFIX),
            completion: if self.answer {
                prompts::YES
            } else {
                prompts::NO
            }
            .to_string(),
            context: Vec::new(),
        }
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trajectory_reads_like_the_worked_example() {
        let t = Trajectory {
            question: "Could a llama give birth twice during the Vietnam War?".into(),
            steps: vec![
                GoldStep {
                    sub_question: "How long is the gestation period of a llama?".into(),
                    answer: GoldAnswer::Retrieved {
                        passages: vec![(
                            "Llama".into(),
                            "The gestation period of a llama is 11.5 months (350 days).".into(),
                        )],
                        fact: "A llama's gestation period is about 11.5 months.".into(),
                        cited: vec![1],
                    },
                },
                GoldStep {
                    sub_question: "How long did the Vietnam War last?".into(),
                    answer: GoldAnswer::Retrieved {
                        passages: vec![(
                            "Vietnam War".into(),
                            "The war lasted from 1 November 1955 to 30 April 1975.".into(),
                        )],
                        fact: "The Vietnam War lasted about 20 years, from 1955 to 1975.".into(),
                        cited: vec![1],
                    },
                },
                GoldStep {
                    sub_question: "Is twice #1 shorter than #2?".into(),
                    answer: GoldAnswer::SelfAnswered {
                        fact: "Yes, 23 months is much shorter than 20 years.".into(),
                    },
                },
            ],
            summary: "Two llama pregnancies take about 23 months, far less than the 20-year war."
                .into(),
            answer: true,
        };
        let ex = t.render("<chat>");
        assert_eq!(ex.prompt, "<chat>");
        // The system prompt's worked example is this very trajectory.
        let example = prompts::SYSTEM
            .split_once(&format!("{}\n", t.user_turn()))
            .unwrap()
            .1;
        let example = example.split("\n\nExample:").next().unwrap();
        assert_eq!(ex.completion, example);
        // The loss covers what the model writes: action keywords, sub-questions, facts.
        let targets: String = {
            let mut kept = String::new();
            let mut at = 0;
            for &(s, e) in &ex.context {
                kept.push_str(&ex.completion[at..s]);
                at = e;
            }
            kept.push_str(&ex.completion[at..]);
            kept
        };
        assert!(targets.starts_with(" AddDecomp\n How long is the gestation period of a llama?\n Retrieve\n A llama's gestation period is about 11.5 months. [P1]\n"), "{targets}");
        assert!(!targets.contains("Passages:") && !targets.contains("Sub-question"));
        assert!(targets.ends_with(" yes"));
        let fin = t.render_final_answer("<final>");
        assert_eq!(
            (fin.prompt.as_str(), fin.completion.as_str()),
            ("<final>Answer:", " yes")
        );
        assert!(t
            .final_user_turn()
            .starts_with("Facts:\n- How long is the gestation period of a llama? A llama's"));
    }
}
