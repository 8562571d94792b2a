//! The excavation end to end on the real SmolLM2 model and the real BM25 index.

use std::path::PathBuf;

use geek_agent::{AnswerSource, Excavator};
use geek_backend::{catalog, Engine, EngineConfig};
use geek_retriever::{Bm25Index, CorpusSource};

/// Serialises the two tests: two models decoding at once on 2 cores slow each other down by an
/// order of magnitude (llama.cpp's worker threads spin while they wait).
static ONE_MODEL_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn model_path() -> PathBuf {
    let path = std::env::var_os("GEEK_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            geek_backend::paths::models_dir(None).join(catalog::test_model().file_name)
        });
    assert!(
        path.is_file(),
        "test model {} missing: run `geek model pull`",
        path.display()
    );
    path
}

fn data_dir() -> PathBuf {
    std::env::var_os("GEEK_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"))
}

fn dev_questions(n: usize) -> Vec<String> {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data_dir().join("strategyqa/dev.json")).unwrap())
            .unwrap();
    v.as_array().unwrap()[..n]
        .iter()
        .map(|q| q["question"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_questions_excavate_with_valid_steps_citations_and_kv_reuse() {
    let _model = ONE_MODEL_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let index = Bm25Index::build(dir.path(), &CorpusSource::defaults(&data_dir())).unwrap();
    let engine = Engine::load(EngineConfig::new(model_path()).with_threads(2)).unwrap();
    let agent = Excavator::builder()
        .backend(engine)
        .retriever(index)
        .max_steps(8)
        .build()
        .unwrap();
    let mut retrieved_steps = 0;
    for question in dev_questions(4) {
        let trace = agent.run(&question).await.unwrap();
        let branch = trace.main_branch();
        assert!(!branch.actions.is_empty());
        assert!(branch.actions.len() <= 8 + 1);
        for step in &branch.steps {
            assert!(step.sub_question.ends_with('?'), "{:?}", step.sub_question);
            if let Some(AnswerSource::Retrieved {
                passages, cited, ..
            }) = &step.source
            {
                retrieved_steps += 1;
                assert!(!passages.is_empty());
                for id in cited {
                    assert!(
                        passages.iter().any(|p| &p.id == id),
                        "{id} was not retrieved"
                    );
                }
            }
        }
        assert!(trace.kv_ratio() <= 1.15, "{question}: {:?}", trace.tokens);
        assert!(
            trace.tokens.without_reuse > 3 * trace.tokens.decoded,
            "{:?}",
            trace.tokens
        );
        let f = &branch.final_answer;
        assert_eq!(f.answer, f.yes_logprob > f.no_logprob);
        let json = serde_json::to_string(&trace).unwrap();
        assert_eq!(
            serde_json::from_str::<geek_agent::Trace>(&json).unwrap(),
            trace
        );
    }
    assert!(retrieved_steps > 0, "no question used retrieval");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exploration_branches_share_the_question_and_vote() {
    let _model = ONE_MODEL_AT_A_TIME.lock().await;
    let engine = Engine::load(EngineConfig::new(model_path()).with_threads(2)).unwrap();
    let agent = Excavator::builder()
        .backend(engine.clone())
        .explore(3)
        .max_steps(4)
        .pre_answer(true)
        .build()
        .unwrap();
    let trace = agent
        .run("Is the Atlantic Ocean larger than Lake Geneva?")
        .await
        .unwrap();
    assert_eq!(trace.branches.len(), 3);
    assert_eq!(trace.yes_votes + trace.no_votes, 3);
    assert!(trace.kv_ratio() <= 1.15, "{:?}", trace.tokens);
    // No retriever: every answered step came from the model.
    for b in &trace.branches {
        for s in &b.steps {
            assert!(matches!(s.source, None | Some(AnswerSource::Model)));
        }
    }
    // Every sequence was released.
    assert!(
        engine.stats().await.unwrap().live_sequences <= 1,
        "only the cached system prompt stays"
    );
}
