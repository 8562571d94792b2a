//! One branch of an excavation: actions chosen under grammars until the final answer.

use std::time::Instant;

use geek_backend::{Completion, GenerateParams, Sampling, StopReason};
use tokio::sync::mpsc::UnboundedSender;

use super::citations::split_citations;
use super::final_answer::final_answer;
use super::{emit, Excavator, CONTEXT_RESERVE};
use crate::model::AgentSequence;
use crate::prompts;
use crate::trace::{
    Action, ActionRecord, ActionTiming, AnswerSource, Branch, Event, FinalAnswer, PassageRef, Step,
    TokenCounts,
};
use crate::{Error, Result};

/// Where a self-answered fact ends.
const SENTENCE_END: &str = ". ";

/// One branch of an excavation, from the question to its final answer.
pub(super) struct BranchRun<'a> {
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

impl<'a> BranchRun<'a> {
    /// Branch `id` of `ex`'s excavation of `question`, starting on `seq` (`len` tokens);
    /// `first_seed` samples its first sub-question instead of decoding greedily.
    pub(super) fn new(
        ex: &'a Excavator,
        id: usize,
        question: &str,
        seq: Box<dyn AgentSequence>,
        len: usize,
        events: Option<UnboundedSender<Event>>,
        first_seed: Option<u32>,
    ) -> Self {
        BranchRun {
            ex,
            id,
            question: question.to_string(),
            seq,
            len,
            counts: TokenCounts::default(),
            steps: Vec::new(),
            actions: Vec::new(),
            events,
            sample_next_sub_question: first_seed,
            timing: ActionTiming::default(),
            action_started: Instant::now(),
        }
    }
}

impl BranchRun<'_> {
    /// Runs to the final answer; returns the branch, its token counts and final length.
    pub(super) async fn run(mut self) -> Result<(Branch, TokenCounts, usize)> {
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

    /// Generates with `params`, streaming the text as [`Event::TokenStream`]s and counting the
    /// tokens and time of the generation.
    async fn generate_streamed(&mut self, params: GenerateParams) -> Result<Completion> {
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
        Ok(done)
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
            logprobs: 0,
        };
        let done = self.generate_streamed(params).await?;
        let mut text = done.text.trim().to_string();
        if done.stop == StopReason::MaxTokens {
            let close = closing.trim_end_matches('\n');
            text.push_str(close);
            self.append(&format!("{close}\n")).await?;
        }
        Ok(text)
    }

    /// One sentence of a free line: generation stops at its first sentence end (or the
    /// newline, or `max_tokens`) and the line is closed there.
    async fn sentence(&mut self, max_tokens: usize) -> Result<String> {
        let params = GenerateParams {
            max_tokens,
            sampling: Sampling::greedy(),
            stop: vec!["\n".into(), SENTENCE_END.into()],
            grammar: Some(prompts::LINE_GRAMMAR.to_string()),
            ignore_eos: false,
            logprobs: 0,
        };
        let done = self.generate_streamed(params).await?;
        let mut text = done.text.trim().to_string();
        match &done.stop {
            StopReason::Stop(s) if s == SENTENCE_END => {
                text.push('.');
                self.append("\n").await?;
            }
            StopReason::MaxTokens => self.append("\n").await?,
            _ => {}
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
            logprobs: 0,
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

    // Longer than 80 lines: one Retrieve action end to end (query, passages, excerpts, extraction, citation and support checks, the fallback to a self answer, its events and timing), in the order the trace records them.
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
        let fact = self.sentence(40).await?;
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
        let (reasoning, scores, counts, timing) = final_answer(
            &*self.ex.model,
            &self.question,
            &facts,
            self.ex.config.final_reasoning,
            &mut |p| {
                emit(
                    &events,
                    Event::TokenStream {
                        branch: id,
                        text: p.to_string(),
                    },
                )
            },
        )
        .await?;
        self.counts.decoded += counts.decoded;
        self.counts.without_reuse += counts.without_reuse;
        self.counts.unique += counts.decoded;
        self.timing.add(&timing);
        Ok((reasoning, scores))
    }
}
