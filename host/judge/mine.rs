//! Label mining (`verdict judge mine`): where does the draft propose a token the target would not
//! have chosen, and is that token acceptable anyway?
//!
//! Per prompt (the target at T = 0): the target's own continuation `c`; the draft's choice at every
//! position of `c` by teacher forcing (one batched draft forward; its argmax, or a draw at a
//! draft temperature > 0, which finds more and worse mismatches); at each mismatch `d_i != c_i` force `d_i`,
//! keep the target's hidden state at `d_i` (the judge's input, exactly the row verification
//! scores) and let the target go on. The label comes from one of two rules:
//! - `tests` (AutoJudge, arXiv 2504.20039): the target finishes the answer after `d_i`; the token
//!   is acceptable if the answer still passes the problem's unit tests (the original must pass).
//! - `rejoin` (cheaper): acceptable if within `m` tokens the forced text becomes identical to the
//!   original continuation's text (same text, other tokens: spacing, token splits).
//!
//! Continuations are greedy and drafted from a hint (the prompt, or the original continuation), so
//! a forced answer that stays close to the original costs a few target forwards, not one per token.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};

use super::humaneval::{self, Outcome, Problem, Sandbox};
use crate::files::write_atomic;
use crate::models::chat::ChatTemplate;
use crate::models::tokenizer::Tokenizer;
use crate::models::{Model, Rows, Session};
use crate::sample;
use crate::verify::judge::TargetIdentity;

/// How a mismatch is labelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    Tests,
    Rejoin { m: usize },
}

impl Rule {
    pub fn name(&self) -> String {
        match self {
            Rule::Tests => "tests".into(),
            Rule::Rejoin { m } => format!("rejoin:m={m}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct MineConfig {
    pub rule: Rule,
    /// Answer length cap (tokens) for the original and forced continuations.
    pub max_tokens: usize,
    /// Mismatches labelled per prompt at most (0 = all), spread evenly over the answer.
    pub max_per_prompt: usize,
    /// The draft's choice: its argmax at 0, else a draw from its softmax at this temperature.
    /// Draws reach the mismatches a weaker draft would make: at T = 0 the 0.5B/1.5B pair
    /// differs at ~1% of positions, and 86% of those are harmless, too few negatives to learn.
    pub draft_temperature: f32,
    /// Seeds the draws (each prompt's from `seed` and its group id).
    pub seed: u64,
    pub sandbox: Sandbox,
}

/// `k` of the indices `0..n`, spread evenly (all of them when `k` is 0 or at least `n`).
pub fn spread(n: usize, k: usize) -> Vec<usize> {
    if k == 0 || k >= n {
        return (0..n).collect();
    }
    (0..k).map(|j| j * n / k).collect()
}

/// Mined samples: the target's hidden state at each mismatching drafted token and its label.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Dataset {
    pub hidden_size: usize,
    /// `[n * hidden_size]`, row-major.
    pub hidden: Vec<f32>,
    pub label: Vec<u8>,
    /// Which prompt a sample came from (validation splits by prompt, never inside one).
    pub group: Vec<u32>,
    pub draft_token: Vec<u32>,
    pub target_token: Vec<u32>,
    /// Target identity, rule and commands, as metadata.
    pub meta: BTreeMap<String, String>,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.label.len()
    }

    pub fn is_empty(&self) -> bool {
        self.label.is_empty()
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.hidden[i * self.hidden_size..(i + 1) * self.hidden_size]
    }

    pub fn positives(&self) -> usize {
        self.label.iter().filter(|&&l| l == 1).count()
    }

    fn push(&mut self, hidden: &[f32], label: bool, group: u32, draft: u32, target: u32) {
        self.hidden.extend_from_slice(hidden);
        self.label.push(label as u8);
        self.group.push(group);
        self.draft_token.push(draft);
        self.target_token.push(target);
    }

    /// Appends `other` (same hidden size and target). Groups are prompts: `other`'s keep the
    /// numbers of an earlier dataset mined from the same problems (the same prompt mined twice,
    /// e.g. at another draft temperature, stays one group, so a validation split by group never
    /// sees a training prompt), and are renumbered after ours otherwise.
    pub fn extend(&mut self, other: &Dataset, what: &str) -> Result<()> {
        let source = |d: &Dataset| {
            format!(
                "group_offset:{}",
                d.meta.get("problems").map_or("", String::as_str)
            )
        };
        if self.hidden_size == 0 {
            *self = other.clone();
            self.meta.insert(source(other), "0".into());
            return Ok(());
        }
        ensure!(
            other.hidden_size == self.hidden_size,
            "{what}: hidden size {} differs from the other datasets' {}",
            other.hidden_size,
            self.hidden_size
        );
        ensure!(
            other.meta.get("target.sha256") == self.meta.get("target.sha256"),
            "{what} was mined on another target than the other datasets"
        );
        let key = source(other);
        let offset = match self.meta.get(&key).and_then(|o| o.parse::<u32>().ok()) {
            Some(o) => o,
            None => {
                let o = self.group.iter().max().map_or(0, |g| g + 1);
                self.meta.insert(key, o.to_string());
                o
            }
        };
        self.hidden.extend_from_slice(&other.hidden);
        self.label.extend_from_slice(&other.label);
        self.group.extend(other.group.iter().map(|g| g + offset));
        self.draft_token.extend_from_slice(&other.draft_token);
        self.target_token.extend_from_slice(&other.target_token);
        Ok(())
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        use safetensors::{Dtype, tensor::TensorView};
        let n = self.len();
        let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let u32s = |v: &[u32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let data: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = vec![
            (
                "hidden",
                Dtype::F32,
                vec![n, self.hidden_size],
                f32s(&self.hidden),
            ),
            ("label", Dtype::U8, vec![n], self.label.clone()),
            ("group", Dtype::U32, vec![n], u32s(&self.group)),
            ("draft_token", Dtype::U32, vec![n], u32s(&self.draft_token)),
            (
                "target_token",
                Dtype::U32,
                vec![n],
                u32s(&self.target_token),
            ),
        ];
        let views = data
            .iter()
            .map(|(name, dt, shape, b)| TensorView::new(*dt, shape.clone(), b).map(|v| (*name, v)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("serialising the dataset: {e}"))?;
        let meta = self.meta.clone().into_iter().collect();
        let bytes = safetensors::serialize(views, Some(meta))
            .map_err(|e| anyhow::anyhow!("serialising the dataset: {e}"))?;
        write_atomic(path, &bytes)
    }

    pub fn load(path: &Path) -> Result<Dataset> {
        let what = format!("dataset {}", path.display());
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {what}"))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| anyhow::anyhow!("{what}: not a safetensors file: {e}"))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| anyhow::anyhow!("{what}: not a safetensors file: {e}"))?;
        let meta: BTreeMap<String, String> = meta
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        ensure!(
            meta.get("format").map(String::as_str) == Some("verdict-judge-dataset"),
            "{what}: not a verdict judge dataset (metadata `format`)"
        );
        let tensor = |name: &str, dt: safetensors::Dtype| {
            let t = st
                .tensor(name)
                .map_err(|e| anyhow::anyhow!("{what}: tensor `{name}`: {e}"))?;
            ensure!(
                t.dtype() == dt,
                "{what}: tensor `{name}` is {:?}, expected {dt:?}",
                t.dtype()
            );
            Ok((t.shape().to_vec(), t.data().to_vec()))
        };
        let words = |b: Vec<u8>| -> Vec<[u8; 4]> {
            b.chunks_exact(4)
                .map(|c| [c[0], c[1], c[2], c[3]])
                .collect()
        };
        let (shape, h) = tensor("hidden", safetensors::Dtype::F32)?;
        ensure!(shape.len() == 2, "{what}: `hidden` must be 2-d");
        let n = shape[0];
        let u32v = |name: &str| -> Result<Vec<u32>> {
            let (s, b) = tensor(name, safetensors::Dtype::U32)?;
            ensure!(s == [n], "{what}: `{name}` has shape {s:?}, expected [{n}]");
            Ok(words(b).into_iter().map(u32::from_le_bytes).collect())
        };
        let (ls, label) = tensor("label", safetensors::Dtype::U8)?;
        ensure!(
            ls == [n],
            "{what}: `label` has shape {ls:?}, expected [{n}]"
        );
        ensure!(
            label.iter().all(|&l| l <= 1),
            "{what}: labels must be 0 or 1"
        );
        Ok(Dataset {
            hidden_size: shape[1],
            hidden: words(h).into_iter().map(f32::from_le_bytes).collect(),
            label,
            group: u32v("group")?,
            draft_token: u32v("draft_token")?,
            target_token: u32v("target_token")?,
            meta,
        })
    }
}

/// What mining one prompt found.
#[derive(Debug, Clone, Default)]
pub struct PromptReport {
    pub tokens: usize,
    pub mismatches: usize,
    pub labelled: usize,
    pub acceptable: usize,
    /// Why the prompt gave no samples (e.g. the target's own answer fails the tests).
    pub skipped: Option<String>,
}

/// The models and text machinery mining needs.
pub struct Miner<'a> {
    pub target: &'a Model,
    pub draft: &'a Model,
    pub tokenizer: &'a Tokenizer,
    pub template: &'a ChatTemplate,
    pub cfg: MineConfig,
}

impl Miner<'_> {
    /// An empty dataset carrying the target's identity and the rule.
    pub fn dataset(&self) -> Result<Dataset> {
        let id = TargetIdentity::of(self.target)?;
        let mut meta = BTreeMap::new();
        meta.insert("format".into(), "verdict-judge-dataset".into());
        meta.insert("target.architecture".into(), id.architecture);
        meta.insert("target.hidden_size".into(), id.hidden_size.to_string());
        meta.insert("target.sha256".into(), id.sha256);
        meta.insert("draft".into(), file_name(self.draft.source()));
        meta.insert("target".into(), file_name(self.target.source()));
        meta.insert("rule".into(), self.cfg.rule.name());
        Ok(Dataset {
            hidden_size: self.target.config().hidden_size,
            meta,
            ..Default::default()
        })
    }

    /// Mines one problem into `out` under group id `group`.
    pub fn mine(&self, p: &Problem, group: u32, out: &mut Dataset) -> Result<PromptReport> {
        let stop = self.tokenizer.eos_ids().to_vec();
        let prompt = humaneval::prompt_ids(p, self.template, self.tokenizer)?;
        let n = prompt.len();
        let mut target = self.target.session();
        if n > 1 {
            target.forward(&prompt[..n - 1], Rows::Last)?;
        }
        let (_, c, stopped) = greedy_lookup(
            &mut target,
            prompt[n - 1],
            &prompt[..n - 1],
            &prompt,
            self.cfg.max_tokens,
            &stop,
        )?;
        let mut report = PromptReport {
            tokens: c.len(),
            ..Default::default()
        };
        if self.cfg.rule == Rule::Tests {
            let reply = self.tokenizer.decode(&c, true)?;
            if let o @ (Outcome::Fail(_) | Outcome::Timeout) =
                self.cfg.sandbox.run(&humaneval::program(p, &reply))?
            {
                report.skipped = Some(format!("the target's own answer does not pass: {o:?}"));
                return Ok(report);
            }
        }
        // The position after a stop is a position too: the draft may want to go on (or stop
        // earlier, where the target went on).
        let mut full = c.clone();
        if let Some(s) = stopped {
            full.push(s);
        }
        let drafted = self.teacher_forced_draft(&prompt, &full, group)?;
        let mismatches: Vec<usize> = (0..full.len()).filter(|&i| drafted[i] != full[i]).collect();
        report.mismatches = mismatches.len();
        let chosen: Vec<usize> = spread(mismatches.len(), self.cfg.max_per_prompt)
            .into_iter()
            .map(|j| mismatches[j])
            .collect();
        // The target session holds prompt + full[..at].
        target.truncate(n)?;
        let mut at = 0usize;
        let mut history: Vec<u32> = prompt.clone();
        for &i in &chosen {
            if i > at {
                target.forward(&full[at..i], Rows::Last)?;
                history.extend_from_slice(&full[at..i]);
                at = i;
            }
            let d = drafted[i];
            let (label, hidden) = self.label(p, &mut target, &history, &full, &c, i, d, &stop)?;
            target.truncate(n + i)?;
            out.push(&hidden, label, group, d, full[i]);
            report.labelled += 1;
            report.acceptable += label as usize;
        }
        Ok(report)
    }

    /// Forces `d` at position `i`; returns the label and the hidden state at `d`.
    #[allow(clippy::too_many_arguments)]
    fn label(
        &self,
        p: &Problem,
        target: &mut Session,
        history: &[u32],
        full: &[u32],
        c: &[u32],
        i: usize,
        d: u32,
        stop: &[u32],
    ) -> Result<(bool, Vec<f32>)> {
        let hint = &full[(i + 1).min(full.len())..];
        // A stop token ends the answer there: nothing follows it.
        let stops = stop.contains(&d);
        let window = match self.cfg.rule {
            Rule::Rejoin { m } => m,
            Rule::Tests => self.cfg.max_tokens.saturating_sub(i + 1),
        };
        let max_new = if stops { 0 } else { window };
        let (hidden, f, _) = greedy_lookup(target, d, history, hint, max_new, stop)?;
        let forced: Vec<u32> = if stops {
            Vec::new()
        } else {
            std::iter::once(d).chain(f).collect()
        };
        let label = match self.cfg.rule {
            // Stopping early never re-joins a continuation that went on.
            Rule::Rejoin { m } => {
                !stops && self.rejoins(&forced, &full[i..(i + m + 4).min(full.len())])?
            }
            Rule::Tests => {
                let answer: Vec<u32> = c[..i].iter().chain(&forced).copied().collect();
                let reply = self.tokenizer.decode(&answer, true)?;
                self.cfg.sandbox.run(&humaneval::program(p, &reply))? == Outcome::Pass
            }
        };
        Ok((label, hidden))
    }

    /// Some prefix of the forced tokens spells the same text as some prefix of the original's.
    fn rejoins(&self, forced: &[u32], original: &[u32]) -> Result<bool> {
        let prefixes = |t: &[u32]| -> Result<Vec<Vec<u8>>> {
            let mut acc = Vec::new();
            let mut out = Vec::new();
            for &id in t {
                acc.extend_from_slice(self.tokenizer.piece(id, true)?);
                out.push(acc.clone());
            }
            Ok(out)
        };
        let orig: HashSet<Vec<u8>> = prefixes(original)?.into_iter().collect();
        Ok(prefixes(forced)?.iter().any(|f| orig.contains(f)))
    }

    /// The draft's choice at each position of `cont` after `prompt`, teacher-forced: its argmax,
    /// or a seeded draw at `draft_temperature`.
    fn teacher_forced_draft(&self, prompt: &[u32], cont: &[u32], group: u32) -> Result<Vec<u32>> {
        let params = sample::SamplingParams {
            temperature: self.cfg.draft_temperature,
            ..Default::default()
        };
        let mut rng = sample::Rng64::new(self.cfg.seed ^ (u64::from(group) << 32));
        let mut s = self.draft.session();
        let n = prompt.len();
        if n > 1 {
            s.forward(&prompt[..n - 1], Rows::Last)?;
        }
        // Row j of the forward over [prompt[n-1], cont[..]] predicts cont[j].
        let input: Vec<u32> = std::iter::once(prompt[n - 1])
            .chain(cont[..cont.len().saturating_sub(1)].iter().copied())
            .collect();
        let mut out = Vec::with_capacity(cont.len());
        for chunk in input.chunks(32) {
            let f = s.forward(chunk, Rows::All)?;
            for row in f.logits.to_vec2::<f32>()? {
                out.push(sample::sample_logits(&row, &params, &mut rng));
            }
        }
        Ok(out)
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Greedy continuation: `session` holds `history`; `first` is fed next. Drafts come from `hint`
/// by n-gram lookup and are verified against the target's argmax, so the output is exactly the
/// greedy one. Returns the hidden state at `first`, the tokens after it (stop excluded) and the
/// stop token if one ended it.
pub fn greedy_lookup(
    session: &mut Session,
    first: u32,
    history: &[u32],
    hint: &[u32],
    max_new: usize,
    stop: &[u32],
) -> Result<(Vec<f32>, Vec<u32>, Option<u32>)> {
    let mut seq: Vec<u32> = history.to_vec();
    seq.push(first);
    let mut last = first;
    let mut out = Vec::new();
    let mut hidden_first = None;
    while out.len() < max_new {
        let room = session.max_len().saturating_sub(session.len() + 1);
        if room == 0 {
            break;
        }
        let mut drafts = lookup(&seq, hint, 8);
        drafts.truncate((max_new - out.len() - 1).min(room));
        let base = session.len();
        let input: Vec<u32> = std::iter::once(last)
            .chain(drafts.iter().copied())
            .collect();
        let f = session.forward(&input, Rows::All)?;
        if hidden_first.is_none() {
            hidden_first = Some(f.hidden.get(0)?.to_vec1::<f32>()?);
        }
        let rows = f.logits.to_vec2::<f32>()?;
        let mut n = 0;
        while n < drafts.len() && sample::argmax(&rows[n]) == drafts[n] {
            n += 1;
        }
        let next = sample::argmax(&rows[n]);
        session.truncate(base + 1 + n)?;
        for &t in drafts[..n].iter().chain(std::iter::once(&next)) {
            if stop.contains(&t) {
                let h = hidden_first.context("no forward ran")?;
                return Ok((h, out, Some(t)));
            }
            out.push(t);
            seq.push(t);
            if out.len() == max_new {
                break;
            }
        }
        last = next;
    }
    let h = match hidden_first {
        Some(h) => h,
        None => session
            .forward(&[first], Rows::All)?
            .hidden
            .get(0)?
            .to_vec1::<f32>()?,
    };
    Ok((h, out, None))
}

/// Up to `n` tokens that followed the latest occurrence in `hint` of `seq`'s last 3 (then 2,
/// then 1) tokens.
fn lookup(seq: &[u32], hint: &[u32], n: usize) -> Vec<u32> {
    for g in (1..=3).rev() {
        if seq.len() < g || hint.len() <= g {
            continue;
        }
        let tail = &seq[seq.len() - g..];
        if let Some(j) = (0..=hint.len() - g)
            .rev()
            .find(|&j| &hint[j..j + g] == tail)
        {
            let from = j + g;
            if from < hint.len() {
                return hint[from..(from + n).min(hint.len())].to_vec();
            }
        }
    }
    Vec::new()
}

/// Mines every problem, printing a line per prompt; fails clearly when nothing was found.
pub fn mine_all(miner: &Miner, problems: &[Problem]) -> Result<Dataset> {
    if miner.cfg.rule == Rule::Tests {
        humaneval::check_python()?;
    }
    let mut data = miner.dataset()?;
    if miner.cfg.draft_temperature > 0.0 {
        data.meta.insert(
            "draft_temperature".into(),
            miner.cfg.draft_temperature.to_string(),
        );
        data.meta.insert("seed".into(), miner.cfg.seed.to_string());
    }
    let (mut mismatches, mut tokens, mut skipped) = (0, 0, 0);
    for (g, p) in problems.iter().enumerate() {
        let t = Instant::now();
        let r = miner
            .mine(p, g as u32, &mut data)
            .with_context(|| format!("mining {}", p.task_id))?;
        mismatches += r.mismatches;
        tokens += r.tokens;
        skipped += r.skipped.is_some() as usize;
        eprintln!(
            "mine: {} [{}/{}]: {} tokens, {} mismatches, {} labelled, {} acceptable{} ({:.1}s)",
            p.task_id,
            g + 1,
            problems.len(),
            r.tokens,
            r.mismatches,
            r.labelled,
            r.acceptable,
            r.skipped
                .map(|s| format!("; skipped: {s}"))
                .unwrap_or_default(),
            t.elapsed().as_secs_f64()
        );
    }
    if data.is_empty() {
        if skipped == problems.len() {
            bail!(
                "no samples: all {skipped} prompts were skipped (the target's own answers fail their tests), nothing written"
            );
        }
        if mismatches == 0 {
            bail!(
                "no mismatches: the draft agreed with the target at all {tokens} positions of {} prompts, so there is nothing to learn (nothing written)",
                problems.len()
            );
        }
        bail!("no samples from {mismatches} mismatches (nothing written)");
    }
    data.meta
        .insert("prompts".into(), problems.len().to_string());
    data.meta.insert("positions".into(), tokens.to_string());
    data.meta
        .insert("mismatches".into(), mismatches.to_string());
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dataset(problems: &str, groups: &[u32]) -> Dataset {
        let mut d = Dataset {
            hidden_size: 2,
            ..Default::default()
        };
        d.meta.insert("problems".into(), problems.into());
        d.meta.insert("target.sha256".into(), "abc".into());
        for &g in groups {
            d.push(&[g as f32, 1.0], g % 2 == 0, g, 1, 2);
        }
        d
    }

    #[test]
    fn extend_keeps_a_prompt_one_group_across_datasets() {
        let mut all = Dataset::default();
        all.extend(&dataset("he lines 0..82", &[0, 3]), "a")
            .unwrap();
        all.extend(&dataset("extra lines 0..16", &[0, 1]), "b")
            .unwrap();
        // The same HumanEval prompts mined again (another temperature): same groups.
        all.extend(&dataset("he lines 0..82", &[3, 5]), "c")
            .unwrap();
        // The extra prompts again: their groups after HumanEval's, as the first time.
        all.extend(&dataset("extra lines 0..16", &[1]), "d")
            .unwrap();
        assert_eq!(all.group, vec![0, 3, 4, 5, 3, 5, 5]);
        assert_eq!(all.len(), 7);
        let mut other = dataset("he lines 0..82", &[0]);
        other.meta.insert("target.sha256".into(), "def".into());
        let err = all.extend(&other, "e").unwrap_err();
        assert!(err.to_string().contains("another target"), "{err}");
    }

    #[test]
    fn spread_picks_evenly_and_all_when_uncapped() {
        assert_eq!(spread(10, 0), (0..10).collect::<Vec<_>>());
        assert_eq!(spread(3, 5), vec![0, 1, 2]);
        assert_eq!(spread(10, 4), vec![0, 2, 5, 7]);
        assert_eq!(spread(0, 4), Vec::<usize>::new());
    }

    #[test]
    fn lookup_takes_the_latest_longest_match() {
        let hint = [1, 2, 3, 9, 1, 2, 3, 4, 5];
        assert_eq!(lookup(&[7, 2, 3], &hint, 2), vec![4, 5]);
        assert_eq!(lookup(&[8, 9], &hint, 3), vec![1, 2, 3]);
        assert_eq!(lookup(&[6], &hint, 3), Vec::<u32>::new());
        assert_eq!(
            lookup(&[5], &hint, 3),
            Vec::<u32>::new(),
            "nothing after the match"
        );
    }
}
