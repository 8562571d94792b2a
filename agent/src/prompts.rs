//! The prompt templates and grammars of the excavation, versioned.
//!
//! The agent's whole transcript for a question is one chat: a system message with the rules and
//! a worked example, the question as the user turn, and the excavation as the assistant turn,
//! one line per action or result. Training data (`geek data trajectories`) is rendered by these
//! same functions, so a model tuned on it sees exactly what the agent shows it.

use crate::trace::Action;

/// Changes whenever a template or grammar below changes.
pub const PROMPT_VERSION: &str = "geek-prompts-v1";

/// The system message: the four actions and one worked example.
pub const SYSTEM: &str = "You answer yes/no questions by excavating knowledge step by step. \
Each step is one action:
AddDecomp: write the next sub-question (refer to earlier answers as #1, #2).
Retrieve: read Wikipedia passages and write the fact that answers the sub-question, citing passages like [P1].
SelfAnswer: answer the sub-question yourself (arithmetic, comparison, common knowledge).
FinalAnswer: summarise the facts, then answer yes or no.

Example:
Question: Could a llama give birth twice during the Vietnam War?
Action: AddDecomp
Sub-question 1: How long is the gestation period of a llama?
Action: Retrieve
Passages:
[P1] Llama: The gestation period of a llama is 11.5 months (350 days).
Fact 1: A llama's gestation period is about 11.5 months. [P1]
Action: AddDecomp
Sub-question 2: How long did the Vietnam War last?
Action: Retrieve
Passages:
[P1] Vietnam War: The war lasted from 1 November 1955 to 30 April 1975.
Fact 2: The Vietnam War lasted about 20 years, from 1955 to 1975. [P1]
Action: AddDecomp
Sub-question 3: Is twice #1 shorter than #2?
Action: SelfAnswer
Fact 3: Yes, 23 months is much shorter than 20 years.
Action: FinalAnswer
Summary: Two llama pregnancies take about 23 months, far less than the 20-year war.
Answer: yes";

/// The user turn.
pub fn user(question: &str) -> String {
    format!("Question: {}", question.trim())
}

/// Opens an action line; the model completes it with [`action_grammar`].
pub const ACTION_PREFIX: &str = "Action:";

/// How an action is written after [`ACTION_PREFIX`].
pub fn action_line(action: Action) -> String {
    format!(" {}\n", action.keyword())
}

/// Opens the k-th sub-question line (1-based).
pub fn sub_question_prefix(k: usize) -> String {
    format!("Sub-question {k}:")
}

/// The passages block shown for a retrieval, then the opening of the fact line.
pub fn passages_block(passages: &[(String, String)], k: usize) -> String {
    let mut s = passage_lines(passages, 1);
    s.push_str(&fact_prefix(k));
    s
}

/// `Passages:` and one `[Pn] Title: text` line per (title, text), numbered from `first`.
pub fn passage_lines(passages: &[(String, String)], first: usize) -> String {
    let mut s = String::from("Passages:\n");
    if passages.is_empty() {
        s.push_str("(no passage found)\n");
    }
    for (i, (title, text)) in passages.iter().enumerate() {
        s.push_str(&format!(
            "[P{}] {}: {}\n",
            i + first,
            one_line(title),
            one_line(text)
        ));
    }
    s
}

/// Opens the k-th fact line.
pub fn fact_prefix(k: usize) -> String {
    format!("Fact {k}:")
}

/// Opens the summary line of a final answer.
pub const SUMMARY_PREFIX: &str = "Summary:";

/// What precedes the scored yes/no.
pub const ANSWER_PREFIX: &str = "Answer:";

/// The two scored continuations after [`ANSWER_PREFIX`].
pub const YES: &str = " yes";
/// See [`YES`].
pub const NO: &str = " no";

/// Opens the plan drafted with pre-answer on.
pub const PLAN_PREFIX: &str = "Plan:\n";

/// Words of a passage shown to the model.
pub const PASSAGE_WORDS: usize = 60;

/// A passage text cut to [`PASSAGE_WORDS`] words on one line.
pub fn passage_excerpt(text: &str) -> String {
    let words: Vec<&str> = text.split_whitespace().collect();
    let mut s = words[..words.len().min(PASSAGE_WORDS)].join(" ");
    if words.len() > PASSAGE_WORDS {
        s.push_str(" …");
    }
    s
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// GBNF for an action line restricted to `allowed`.
pub fn action_grammar(allowed: &[Action]) -> String {
    let alts: Vec<String> = allowed
        .iter()
        .map(|a| format!("\"{}\"", a.keyword()))
        .collect();
    format!("root ::= \" \" ({}) \"\\n\"\n", alts.join(" | "))
}

/// GBNF for a sub-question: one line, capital first, ending with a question mark.
pub const SUB_QUESTION_GRAMMAR: &str = "root ::= \" \" [A-Z] [^?\\n]* \"?\\n\"\n";

/// GBNF for a free one-line answer (self answers, summaries).
pub const LINE_GRAMMAR: &str = "root ::= \" \" [^\\n]+ \"\\n\"\n";

/// GBNF for a fact that cites some of `n` passages: `text [P1]` or `text [P1, P3]`.
pub fn cited_fact_grammar(n: usize) -> String {
    if n == 0 {
        return LINE_GRAMMAR.to_string();
    }
    let refs: Vec<String> = (1..=n).map(|i| format!("\"P{i}\"")).collect();
    format!(
        "root ::= \" \" [^\\n\\[]+ \"[\" ref (\", \" ref)* \"]\\n\"\nref ::= {}\n",
        refs.join(" | ")
    )
}

/// GBNF for a pre-answer plan: remaining sub-questions with guessed answers.
pub const PLAN_GRAMMAR: &str = "root ::= line line? line? \"End\\n\"
line ::= \"Sub-question \" [0-9] \": \" [A-Z] [^?\\n]* \"? Guess: \" [^\\n]+ \"\\n\"
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_render_as_the_example_does() {
        assert!(SYSTEM.contains(&format!("Action:{}", action_line(Action::AddDecomp))));
        assert!(SYSTEM.contains(&sub_question_prefix(1)));
        let block = passages_block(&[("Llama".into(), "A  camelid.\nDomesticated.".into())], 2);
        assert_eq!(
            block,
            "Passages:\n[P1] Llama: A camelid. Domesticated.\nFact 2:"
        );
        assert_eq!(
            passages_block(&[], 1),
            "Passages:\n(no passage found)\nFact 1:"
        );
        assert!(action_grammar(&[Action::AddDecomp, Action::FinalAnswer])
            .contains("(\"AddDecomp\" | \"FinalAnswer\")"));
        assert!(cited_fact_grammar(2).contains("ref ::= \"P1\" | \"P2\""));
        let long = "w ".repeat(100);
        assert!(passage_excerpt(&long).ends_with('…'));
    }
}
