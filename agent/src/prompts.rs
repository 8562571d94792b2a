//! The prompt templates and grammars of the excavation, versioned.
//!
//! The agent's whole transcript for a question is one chat: a system message with the rules and
//! a worked example, the question as the user turn, and the excavation as the assistant turn,
//! one line per action or result. Training data (`geek data trajectories`) is rendered by these
//! same functions, so a model tuned on it sees exactly what the agent shows it.

use crate::trace::Action;

/// Changes whenever a template or grammar below changes.
pub const PROMPT_VERSION: &str = "geek-prompts-v4";

/// The system message: the four actions and two worked examples (one answered yes from
/// passages, one answered no after passages that did not help).
pub const SYSTEM: &str = "You answer yes/no questions by excavating knowledge step by step. \
Each step is one action:
AddDecomp: write the next sub-question (refer to earlier answers as #1, #2).
Retrieve: read Wikipedia passages and write the fact that answers the sub-question, citing passages like [P1]. If no passage answers it, write: No passage answers it.
SelfAnswer: answer the sub-question yourself (arithmetic, comparison, common knowledge).
FinalAnswer: reason over the facts in one sentence, then answer yes or no.

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
Answer: yes

Example:
Question: Would a vegan eat a Margherita pizza?
Action: AddDecomp
Sub-question 1: What is on a Margherita pizza?
Action: Retrieve
Passages:
[P1] Margaret Thatcher: Margaret Thatcher was Prime Minister of the United Kingdom from 1979 to 1990.
Fact 1: No passage answers it.
Action: SelfAnswer
Fact 1: A Margherita pizza is topped with tomato, mozzarella cheese and basil.
Action: AddDecomp
Sub-question 2: Do vegans eat cheese?
Action: SelfAnswer
Fact 2: No, vegans eat no animal products, and cheese is made from milk.
Action: FinalAnswer
Summary: A Margherita pizza has mozzarella cheese, which vegans do not eat.
Answer: no";

/// The system message of the final answer, a short prompt of its own: the question and the
/// excavated facts, without the passages and the rest of the transcript.
pub const FINAL_SYSTEM: &str = "Answer the yes/no question with yes or no. Facts found for it \
are given; they may be incomplete, and a few may be wrong, so also use what you know.";

/// [`FINAL_SYSTEM`] when the final answer reasons first.
pub const FINAL_REASONING_SYSTEM: &str = "Answer the yes/no question. Facts found for it are \
given; they may be incomplete, and a few may be wrong, so also use what you know. Reason in \
one or two sentences, then answer yes or no.";

/// Opens the reasoning line of the final answer.
pub const REASONING_PREFIX: &str = "Reasoning:";

/// The user turn of the final answer: the (sub-question, fact) pairs, then the question.
pub fn final_user(question: &str, facts: &[(String, String)]) -> String {
    let mut s = String::new();
    if !facts.is_empty() {
        s.push_str("Facts:\n");
        for (q, f) in facts {
            s.push_str(&format!("- {} {}\n", one_line(q), one_line(f)));
        }
    }
    s.push_str(&user(question));
    s
}

/// What the extractor writes when no passage answers the sub-question; the agent then
/// answers it with SelfAnswer.
pub const NO_ANSWER: &str = "No passage answers it.";

/// The user turn.
pub fn user(question: &str) -> String {
    format!("Question: {}", question.trim())
}

/// A solved question shown before the user's own (few-shot demonstrations chosen per question).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Demonstration {
    /// The question.
    pub question: String,
    /// Its sub-questions, in order.
    pub sub_questions: Vec<String>,
    /// The facts that answer them.
    pub facts: Vec<String>,
    /// The answer.
    pub answer: bool,
}

/// The user turn with demonstrations before the question.
pub fn user_with_demonstrations(question: &str, demos: &[Demonstration]) -> String {
    if demos.is_empty() {
        return user(question);
    }
    let mut s = String::from("Similar questions and how they were answered:\n");
    for d in demos {
        s.push_str(&format!("- {}\n", one_line(&d.question)));
        for (i, q) in d.sub_questions.iter().enumerate() {
            s.push_str(&format!("  Sub-question {}: {}\n", i + 1, one_line(q)));
        }
        let facts: Vec<String> = d.facts.iter().map(|f| one_line(f)).collect();
        s.push_str(&format!("  Facts: {}\n", facts.join(" ")));
        s.push_str(&format!(
            "  Answer: {}\n",
            if d.answer { "yes" } else { "no" }
        ));
    }
    s.push('\n');
    s.push_str(&user(question));
    s
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

/// The sentences of a passage that bear on `query`, in passage order, up to
/// [`PASSAGE_WORDS`] words: sentences are ranked by the query words they contain (the first
/// sentence wins ties), so the answer need not be in the first 60 words to be shown.
pub fn passage_excerpt_for(text: &str, query: &str) -> String {
    let sentences = split_sentences(text);
    if sentences.len() <= 1 {
        return passage_excerpt(text);
    }
    let wanted = content_words(query);
    let mut ranked: Vec<(usize, usize)> = sentences
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let have = content_words(s);
            (i, wanted.iter().filter(|w| have.contains(w)).count())
        })
        .collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut keep = Vec::new();
    let mut words = 0;
    for (i, _) in ranked {
        let n = sentences[i].split_whitespace().count();
        if words > 0 && words + n > PASSAGE_WORDS {
            continue;
        }
        keep.push(i);
        words += n;
    }
    keep.sort_unstable();
    let chosen: Vec<&str> = keep.iter().map(|&i| sentences[i]).collect();
    let cut = passage_excerpt(&chosen.join(" "));
    if keep.len() < sentences.len() && !cut.ends_with('…') {
        format!("{cut} …")
    } else {
        cut
    }
}

/// A text split after `.`, `!` or `?` followed by white space.
fn split_sentences(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let bytes = text.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        let ends = matches!(b, b'.' | b'!' | b'?')
            && bytes.get(i + 1).is_some_and(|c| c.is_ascii_whitespace());
        if ends {
            let s = text[start..=i].trim();
            if !s.is_empty() {
                out.push(s);
            }
            start = i + 1;
        }
    }
    let rest = text[start..].trim();
    if !rest.is_empty() {
        out.push(rest);
    }
    out
}

/// Lowercased words of three letters or more that are not common function words.
pub fn content_words(text: &str) -> Vec<String> {
    const STOP: &[&str] = &[
        "the", "and", "for", "are", "was", "were", "that", "this", "with", "from", "have", "has",
        "had", "not", "but", "can", "could", "would", "did", "does", "its", "their", "there",
        "what", "which", "who", "whom", "how", "when", "where", "why", "been", "being", "into",
        "than", "then", "they", "them", "these", "those", "will", "about", "also", "any", "all",
        "one", "his", "her", "she", "him", "our", "you", "your", "more", "most", "such", "only",
        "other", "some", "many", "much", "very", "over", "under", "yes",
    ];
    let mut out: Vec<String> = Vec::new();
    for w in text
        .split(|c: char| !c.is_alphanumeric())
        .map(str::to_lowercase)
    {
        if w.chars().count() >= 3 && !STOP.contains(&w.as_str()) && !out.contains(&w) {
            out.push(w);
        }
    }
    out
}

/// Share of the fact's content words found in `passages` (1.0 for a fact with none).
pub fn support(fact: &str, passages: &[&str]) -> f32 {
    let words = content_words(fact);
    if words.is_empty() {
        return 1.0;
    }
    let have: Vec<String> = passages.iter().flat_map(|p| content_words(p)).collect();
    let found = words
        .iter()
        .filter(|w| have.iter().any(|h| h == *w || stem_match(h, w)))
        .count();
    found as f32 / words.len() as f32
}

/// Two words that share a stem of five letters or more ("gestation" / "gestational").
fn stem_match(a: &str, b: &str) -> bool {
    let n = a.chars().zip(b.chars()).take_while(|(x, y)| x == y).count();
    n >= 5 || (n >= 4 && a.len().min(b.len()) == n + 1)
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

/// GBNF for a fact that cites some of `n` passages (`text [P1]` or `text [P1, P3]`), or
/// [`NO_ANSWER`].
pub fn cited_fact_grammar(n: usize) -> String {
    if n == 0 {
        return format!("root ::= \" {NO_ANSWER}\\n\"\n");
    }
    let refs: Vec<String> = (1..=n).map(|i| format!("\"P{i}\"")).collect();
    format!(
        "root ::= \" \" (\"{NO_ANSWER}\" | fact) \"\\n\"\nfact ::= [^\\n\\[]+ \"[\" ref (\", \" ref)* \"]\"\nref ::= {}\n",
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
        assert!(cited_fact_grammar(2).contains(NO_ANSWER));
        let long = "w ".repeat(100);
        assert!(passage_excerpt(&long).ends_with('…'));
    }

    #[test]
    fn excerpts_keep_the_sentences_that_bear_on_the_query() {
        let text = "The llama is a domesticated camelid. It is used as a pack animal. \
                    Llamas are social animals. The gestation period of a llama is 350 days.";
        let ex = passage_excerpt_for(text, "How long is a llama's gestation?");
        assert!(
            ex.contains("gestation period of a llama is 350 days"),
            "{ex}"
        );
        // Order kept, and a one-sentence text is the plain excerpt.
        assert!(ex.find("domesticated").unwrap() < ex.find("gestation").unwrap());
        assert_eq!(passage_excerpt_for("One sentence", "q"), "One sentence");
    }

    #[test]
    fn support_counts_the_facts_words_in_the_passages() {
        let p = "The gestation period of a llama is 11.5 months (350 days).";
        assert!(support("A llama's gestation period is about 11.5 months.", &[p]) > 0.7);
        assert!(support("Elizabeth Hunter's husband was King George VI.", &[p]) < 0.2);
        assert_eq!(support("It is.", &[p]), 1.0);
    }
}
