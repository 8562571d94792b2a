//! The loop's logic against a scripted model: deterministic transcripts.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use geek_agent::scripted::ScriptedModel;
use geek_agent::{Action, AnswerSource, Event, Excavator};
use geek_retriever::{BoxFuture, Passage, Retriever};

/// Returns fixed passages, or fails when `fail` is set.
struct FixedRetriever {
    fail: bool,
    calls: AtomicUsize,
}

impl Retriever for FixedRetriever {
    fn name(&self) -> String {
        "fixed".into()
    }
    fn retrieve<'a>(
        &'a self,
        query: &'a str,
        k: usize,
    ) -> BoxFuture<'a, geek_retriever::Result<Vec<Passage>>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            if self.fail {
                return Err(geek_retriever::Error::Web {
                    provider: "fixed".into(),
                    reason: "down".into(),
                });
            }
            Ok((1..=3)
                .map(|i| Passage {
                    id: format!("Doc-{i}"),
                    title: format!("Doc {i}"),
                    section: String::new(),
                    text: format!("Passage {i} about {query}"),
                    score: 10.0 - i as f32,
                    source: "fixed".into(),
                })
                .take(k)
                .collect())
        })
    }
}

/// The transcript after the question (the system prompt's example is not the model's work).
fn excavation(t: &str) -> &str {
    t.rsplit("</user>").next().unwrap_or(t)
}

fn retriever(fail: bool) -> Arc<FixedRetriever> {
    Arc::new(FixedRetriever {
        fail,
        calls: AtomicUsize::new(0),
    })
}

/// Decomposes forever with new sub-questions, retrieving each answer.
fn endless_decomposer() -> ScriptedModel {
    ScriptedModel::new(|t, _| {
        let n = t.matches("Sub-question").count();
        if t.ends_with("Action:") {
            if t.ends_with("?\nAction:") {
                " Retrieve\n".into()
            } else {
                " AddDecomp\n".into()
            }
        } else if t.ends_with(':')
            && t.rsplit('\n')
                .next()
                .unwrap_or("")
                .starts_with("Sub-question")
        {
            format!(" What is thing number {n}?\n")
        } else if t.ends_with(':') && t.rsplit('\n').next().unwrap_or("").starts_with("Fact") {
            " Thing is known. [P2]\n".into()
        } else {
            " Things were found.\n".into()
        }
    })
}

#[tokio::test]
async fn the_step_budget_forces_a_final_answer() {
    let r = retriever(false);
    let agent = Excavator::builder()
        .backend(endless_decomposer())
        .retriever(r.clone())
        .max_steps(5)
        .build()
        .unwrap();
    let trace = agent.run("Is the budget respected?").await.unwrap();
    let b = trace.main_branch();
    let kinds: Vec<Action> = b.actions.iter().map(|a| a.action).collect();
    use Action::*;
    assert_eq!(
        kinds,
        vec![
            AddDecomp,
            Retrieve,
            AddDecomp,
            Retrieve,
            AddDecomp,
            FinalAnswer
        ]
    );
    assert!(b.final_answer.forced);
    assert!(b
        .actions
        .last()
        .unwrap()
        .note
        .as_deref()
        .unwrap()
        .contains("budget of 5"));
    assert_eq!(b.steps.len(), 3);
    assert!(
        b.steps[2].answer.is_none(),
        "the last sub-question was cut by the budget"
    );
    assert_eq!(r.calls.load(Ordering::SeqCst), 2);
    // Citations point into the passages shown.
    match b.steps[0].source.as_ref().unwrap() {
        AnswerSource::Retrieved {
            passages, cited, ..
        } => {
            assert_eq!(cited, &vec!["Doc-2".to_string()]);
            assert!(passages.iter().any(|p| p.id == cited[0]));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(b.steps[0].answer.as_deref(), Some("Thing is known."));
    assert!(trace.answer, "scripted scores favour yes");
    assert!(trace.kv_ratio() <= 1.15, "{:?}", trace.tokens);
    assert!(trace.tokens.without_reuse > 5 * trace.tokens.decoded);
}

#[tokio::test]
async fn a_repeated_sub_question_is_rejected_and_counted() {
    let model = ScriptedModel::new(|t, _| {
        if t.ends_with("?\nAction:") {
            " SelfAnswer\n".into()
        } else if t.ends_with("Action:") {
            " AddDecomp\n".into()
        } else if t
            .rsplit('\n')
            .next()
            .unwrap_or("")
            .starts_with("Sub-question")
        {
            " How long is a llama pregnant?\n".into()
        } else {
            " About a year.\n".into()
        }
    });
    let agent = Excavator::builder()
        .backend(model)
        .max_steps(5)
        .build()
        .unwrap();
    let trace = agent
        .run("Could a llama give birth twice during the Vietnam War?")
        .await
        .unwrap();
    let b = trace.main_branch();
    assert_eq!(b.steps.len(), 1, "{:?}", b.steps);
    let rejected: Vec<_> = b
        .actions
        .iter()
        .filter(|a| a.note.as_deref().is_some_and(|n| n.contains("repeated")))
        .collect();
    assert_eq!(rejected.len(), 3, "{:?}", b.actions);
    assert!(b.final_answer.forced);
    assert_eq!(b.steps[0].source, Some(AnswerSource::Model));
    assert!(trace.kv_ratio() <= 1.15, "{:?}", trace.tokens);
}

#[tokio::test]
async fn a_failing_retriever_degrades_to_no_passages() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let agent = Excavator::builder()
        .backend(endless_decomposer())
        .retriever(retriever(true))
        .max_steps(2)
        .build()
        .unwrap();
    let trace = agent.run_streaming("Does it survive?", tx).await.unwrap();
    match trace.main_branch().steps[0].source.as_ref().unwrap() {
        AnswerSource::Retrieved {
            passages,
            cited,
            error,
            ..
        } => {
            assert!(passages.is_empty() && cited.is_empty());
            assert!(error.as_deref().unwrap().contains("down"));
        }
        other => panic!("{other:?}"),
    }
    let mut events = Vec::new();
    while let Ok(e) = rx.try_recv() {
        events.push(e);
    }
    assert!(events.iter().any(
        |e| matches!(e, Event::Error { message, .. } if message.contains("retrieval failed"))
    ));
    assert!(matches!(events.last(), Some(Event::Answer { .. })));
}

#[tokio::test]
async fn explore_three_votes_the_majority() {
    // Branch 0 decodes greedily; branches 1 and 2 sample their first sub-question. The script
    // writes "alpha" for greedy and seed 1, "beta" for seed 2; scores favour yes after alpha.
    let model = ScriptedModel::new(|t, p| {
        if t.ends_with("?\nAction:") {
            " SelfAnswer\n".into()
        } else if t.ends_with("Action:") {
            if excavation(t).contains("Sub-question 1:") {
                " FinalAnswer\n".into()
            } else {
                " AddDecomp\n".into()
            }
        } else if t
            .rsplit('\n')
            .next()
            .unwrap_or("")
            .starts_with("Sub-question")
        {
            if p.sampling.temperature > 0.0 && p.sampling.seed == 2 {
                " Is it beta?\n".into()
            } else {
                " Is it alpha?\n".into()
            }
        } else {
            " Maybe.\n".into()
        }
    })
    .with_scores(|t, _| {
        // The final answer's prompt lists the branch's facts.
        if t.contains("it alpha") {
            vec![-0.2, -1.5]
        } else {
            vec![-3.0, -0.1]
        }
    });
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let agent = Excavator::builder()
        .backend(model)
        .explore(3)
        .build()
        .unwrap();
    let trace = agent.run_streaming("Alpha or beta?", tx).await.unwrap();
    assert_eq!(trace.branches.len(), 3);
    assert_eq!((trace.yes_votes, trace.no_votes), (2, 1));
    assert!(trace.answer);
    assert_eq!(trace.branches[2].steps[0].sub_question, "Is it beta?");
    assert!(!trace.branches[2].final_answer.answer);
    let mut answered = 0;
    while let Ok(e) = rx.try_recv() {
        if matches!(e, Event::BranchAnswered { .. }) {
            answered += 1;
        }
    }
    assert_eq!(answered, 3);
    // Ties are broken by summed log-probabilities.
    let tie = ScriptedModel::new(|t, p| {
        if t.ends_with("?\nAction:") {
            " SelfAnswer\n".into()
        } else if t.ends_with("Action:") {
            if excavation(t).contains("Sub-question 1:") {
                " FinalAnswer\n".into()
            } else {
                " AddDecomp\n".into()
            }
        } else if t
            .rsplit('\n')
            .next()
            .unwrap_or("")
            .starts_with("Sub-question")
        {
            if p.sampling.temperature > 0.0 {
                " Is it beta?\n".into()
            } else {
                " Is it alpha?\n".into()
            }
        } else {
            " Maybe.\n".into()
        }
    })
    .with_scores(|t, _| {
        if t.contains("it alpha") {
            vec![-0.5, -0.9]
        } else {
            vec![-4.0, -0.1]
        }
    });
    let trace = Excavator::builder()
        .backend(tie)
        .explore(2)
        .build()
        .unwrap()
        .run("Tie?")
        .await
        .unwrap();
    assert_eq!((trace.yes_votes, trace.no_votes), (1, 1));
    assert!(!trace.answer, "summed log-probs favour no (-4.5 vs -1.0)");
}

#[tokio::test]
async fn trace_json_has_the_documented_shape() {
    let agent = Excavator::builder()
        .backend(endless_decomposer())
        .retriever(retriever(false))
        .max_steps(2)
        .build()
        .unwrap();
    let trace = agent.run("Shape?").await.unwrap();
    let v = serde_json::to_value(&trace).unwrap();
    for key in [
        "version",
        "question",
        "answer",
        "yes_votes",
        "no_votes",
        "branches",
        "tokens",
        "model",
        "retriever",
        "prompt_version",
        "config",
        "seconds",
    ] {
        assert!(v.get(key).is_some(), "missing {key}");
    }
    let step = &v["branches"][0]["steps"][0];
    assert_eq!(step["source"]["kind"], "retrieved");
    assert_eq!(v["branches"][0]["actions"][0]["action"], "add_decomp");
    let back: geek_agent::Trace = serde_json::from_value(v).unwrap();
    assert_eq!(back, trace);
    assert!(Excavator::builder().build().is_err());
    assert!(matches!(
        agent.run("  ").await,
        Err(geek_agent::Error::EmptyQuestion)
    ));
}

/// A fact its cited passage does not support is replaced by "No passage answers it." and the
/// sub-question is answered by the model, as the second worked example shows.
#[tokio::test]
async fn an_unsupported_fact_falls_back_to_self_answer() {
    let transcripts = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = transcripts.clone();
    let model = ScriptedModel::new(move |t, _| {
        seen.lock().unwrap().push(t.to_string());
        let last = t.rsplit('\n').next().unwrap_or("");
        if t.ends_with("Action:") {
            if excavation(t).contains("Sub-question 1:") {
                if t.ends_with("?\nAction:") {
                    " Retrieve\n".into()
                } else {
                    " FinalAnswer\n".into()
                }
            } else {
                " AddDecomp\n".into()
            }
        } else if last.starts_with("Sub-question") {
            " Can elephants fly?\n".into()
        } else if last.starts_with("Fact") && excavation(t).contains("Passages:\n[P1]") {
            if excavation(t).contains("Action: SelfAnswer") {
                " No, elephants are far too heavy to fly.\n".into()
            } else {
                " Elephants migrate south every winter across Africa. [P1]\n".into()
            }
        } else {
            " Elephants cannot fly.\n".into()
        }
    });
    let agent = Excavator::builder()
        .backend(model)
        .retriever(retriever(false))
        .build()
        .unwrap();
    let trace = agent.run("Can elephants fly?").await.unwrap();
    let step = &trace.main_branch().steps[0];
    assert_eq!(
        step.answer.as_deref(),
        Some("No, elephants are far too heavy to fly.")
    );
    match step.source.as_ref().unwrap() {
        AnswerSource::Retrieved {
            cited, unsupported, ..
        } => {
            assert!(cited.is_empty());
            assert!(unsupported.as_deref().unwrap().contains("unsupported"));
        }
        other => panic!("{other:?}"),
    }
    // The transcript the next action is chosen after.
    let all = transcripts.lock().unwrap();
    let t = all
        .iter()
        .find(|t| t.contains("No, elephants are far too heavy to fly.\nAction:"))
        .expect("an action chosen after the self answer");
    let ex = excavation(t);
    assert!(
        ex.contains("Fact 1: No passage answers it.\nAction: SelfAnswer\nFact 1: No, elephants"),
        "{ex}"
    );
    assert!(
        !ex.contains("migrate south"),
        "the rejected fact is gone: {ex}"
    );
}
