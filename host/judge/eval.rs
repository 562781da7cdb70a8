//! `verdict eval humaneval`: quality and speed of acceptance policies on held-out HumanEval
//! problems, side by side in one run. Per configuration: pass@1 (tests executed in the
//! sandbox), tokens per step, decode tokens/s, the target's mean log-likelihood of the output,
//! and the share of strict's rejections the policy overturned (T = 0).

use std::fmt::Write as _;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use super::humaneval::{self, Outcome, Problem, Sandbox};
use crate::draft::DrafterSpec;
use crate::engine::{Engine, GenerateRequest, Speculation};
use crate::models::chat::ChatTemplate;
use crate::models::tokenizer::Tokenizer;
use crate::sample::SamplingParams;

/// One configuration: `target` (autoregressive) or `POLICY[:name=value,...]`.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalConfig {
    pub label: String,
    /// `None`: autoregressive target only.
    pub policy: Option<String>,
    pub params: Vec<(String, f64)>,
}

impl EvalConfig {
    pub fn parse(s: &str) -> Result<EvalConfig> {
        let s = s.trim();
        if s == "target" {
            return Ok(EvalConfig {
                label: "target only".into(),
                policy: None,
                params: Vec::new(),
            });
        }
        let (name, rest) = s.split_once(':').unwrap_or((s, ""));
        if name.is_empty() {
            bail!("configuration `{s}`: no policy name");
        }
        let mut params = Vec::new();
        for kv in rest.split(',').filter(|x| !x.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .with_context(|| format!("configuration `{s}`: `{kv}` is not name=value"))?;
            let v: f64 = v
                .parse()
                .with_context(|| format!("configuration `{s}`: `{v}` is not a number"))?;
            params.push((k.to_string(), v));
        }
        Ok(EvalConfig {
            label: s.to_string(),
            policy: Some(name.to_string()),
            params,
        })
    }
}

/// Per-problem result.
#[derive(Debug, Clone, Serialize)]
pub struct ProblemResult {
    pub task_id: String,
    pub passed: bool,
    pub outcome: String,
    pub tokens: u64,
    pub steps: u64,
    pub seconds: f64,
    pub target_logprob: f64,
    pub overturned: u64,
    pub rejections: u64,
    pub output: Vec<u32>,
}

/// One configuration: its per-problem results; the totals are sums over them.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigResult {
    pub config: String,
    pub results: Vec<ProblemResult>,
}

impl ConfigResult {
    fn sum(&self, f: impl Fn(&ProblemResult) -> f64) -> f64 {
        self.results.iter().map(f).sum()
    }
    pub fn problems(&self) -> usize {
        self.results.len()
    }
    pub fn passed(&self) -> usize {
        self.results.iter().filter(|r| r.passed).count()
    }
    pub fn pass_at_1(&self) -> f64 {
        self.passed() as f64 / self.problems().max(1) as f64
    }
    /// Decoded tokens (after each prefill's first one): the numerator of tokens/s and
    /// tokens/step.
    pub fn decoded(&self) -> f64 {
        self.sum(|r| r.tokens.saturating_sub(1) as f64)
    }
    pub fn tokens_per_step(&self) -> f64 {
        self.decoded() / self.sum(|r| r.steps as f64).max(1.0)
    }
    pub fn tokens_per_second(&self) -> f64 {
        self.decoded() / self.sum(|r| r.seconds).max(1e-9)
    }
    /// Mean over every generated token (the prefill's first one included).
    pub fn mean_logprob(&self) -> f64 {
        self.sum(|r| r.target_logprob) / self.sum(|r| r.tokens as f64).max(1.0)
    }
    pub fn overturned(&self) -> u64 {
        self.results.iter().map(|r| r.overturned).sum()
    }
    /// overturned / (overturned + rejections that stood), as `SpecStats::overturned_share`.
    pub fn overturned_share(&self) -> f64 {
        let all = self.overturned() + self.results.iter().map(|r| r.rejections).sum::<u64>();
        self.overturned() as f64 / all.max(1) as f64
    }
}

pub struct Evaluator<'a> {
    pub engine: &'a Engine,
    pub tokenizer: &'a Tokenizer,
    pub template: &'a ChatTemplate,
    pub sandbox: Sandbox,
    pub k: usize,
    pub max_tokens: usize,
}

impl Evaluator<'_> {
    pub fn run(&self, cfg: &EvalConfig, problems: &[Problem]) -> Result<ConfigResult> {
        let mut r = ConfigResult {
            config: cfg.label.clone(),
            results: Vec::new(),
        };
        for p in problems {
            let prompt = humaneval::prompt_ids(p, self.template, self.tokenizer)?;
            let speculation = match cfg.policy {
                None => Speculation::Off,
                Some(_) => Speculation::Draft {
                    drafter: Some(DrafterSpec::Model),
                    k: Some(self.k),
                },
            };
            let mut g = self
                .engine
                .start(GenerateRequest {
                    prompt,
                    max_tokens: self.max_tokens,
                    sampling: SamplingParams::greedy(),
                    seed: Some(0),
                    stop_tokens: self.tokenizer.eos_ids().to_vec(),
                    speculation,
                    policy: cfg.policy.clone(),
                    policy_params: cfg.params.clone(),
                    adaptive: Some(false),
                    ..Default::default()
                })
                .map_err(|e| anyhow::anyhow!("{}: {e}", cfg.label))?;
            // The prefill is the same for every configuration: time the decode only.
            g.step()?;
            let t = Instant::now();
            while g.finished().is_none() {
                g.step()?;
            }
            let seconds = t.elapsed().as_secs_f64();
            let s = g.stats().clone();
            let reply = self.tokenizer.decode(g.output(), true)?;
            let outcome = self.sandbox.run(&humaneval::program(p, &reply))?;
            let passed = outcome == Outcome::Pass;
            eprintln!(
                "eval: {} {}: {} ({} tokens, {:.2} tokens/step, {:.1}s)",
                cfg.label,
                p.task_id,
                if passed { "pass" } else { "fail" },
                s.tokens,
                s.tokens_per_step(),
                seconds
            );
            r.results.push(ProblemResult {
                task_id: p.task_id.clone(),
                passed,
                outcome: format!("{outcome:?}"),
                tokens: s.tokens,
                steps: s.steps,
                seconds,
                target_logprob: s.target_logprob,
                overturned: s.accepted_off_argmax,
                rejections: s.rejections,
                output: g.output().to_vec(),
            });
        }
        Ok(r)
    }
}

/// The markdown table.
pub fn table(rows: &[ConfigResult]) -> String {
    let mut s = String::new();
    let base_tps = rows.first().map(|r| r.tokens_per_second()).unwrap_or(1.0);
    let strict_tps = rows
        .iter()
        .find(|r| r.config == "strict")
        .map(|r| r.tokens_per_step());
    let _ = writeln!(
        s,
        "| configuration | pass@1 | tokens/step | vs strict | tok/s | speed vs first row | mean target log-lik | strict rejections overturned |"
    );
    let _ = writeln!(s, "| --- | --- | --- | --- | --- | --- | --- | --- |");
    for r in rows {
        let vs = match strict_tps {
            Some(b) if r.config != "target only" => format!("{:.2}x", r.tokens_per_step() / b),
            _ => "-".into(),
        };
        let _ = writeln!(
            s,
            "| {} | {:.1}% ({}/{}) | {:.2} | {} | {:.2} | {:.2}x | {:.4} | {} |",
            r.config,
            100.0 * r.pass_at_1(),
            r.passed(),
            r.problems(),
            r.tokens_per_step(),
            vs,
            r.tokens_per_second(),
            r.tokens_per_second() / base_tps.max(1e-9),
            r.mean_logprob(),
            if r.config == "target only" {
                "-".into()
            } else {
                format!(
                    "{:.0}% ({}/{})",
                    100.0 * r.overturned_share(),
                    r.overturned(),
                    r.overturned() + r.results.iter().map(|x| x.rejections).sum::<u64>()
                )
            }
        );
    }
    s
}

/// A scatter plot of pass@1 against tokens per step, one labelled point per configuration.
pub fn svg(rows: &[ConfigResult], title: &str) -> String {
    let (w, h, m) = (640.0, 420.0, 60.0);
    let xs: Vec<f64> = rows.iter().map(|r| r.tokens_per_step()).collect();
    let ys: Vec<f64> = rows.iter().map(|r| 100.0 * r.pass_at_1()).collect();
    let (x0, x1) = (0.0, xs.iter().copied().fold(1.0, f64::max) * 1.1);
    let (y0, y1) = (
        (ys.iter().copied().fold(100.0, f64::min) - 10.0).max(0.0),
        (ys.iter().copied().fold(0.0, f64::max) + 5.0).min(100.0),
    );
    let px = |x: f64| m + (x - x0) / (x1 - x0).max(1e-9) * (w - 2.0 * m);
    let py = |y: f64| h - m - (y - y0) / (y1 - y0).max(1e-9) * (h - 2.0 * m);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="14">{}</text>"#,
        w / 2.0,
        escape(title)
    );
    let _ = writeln!(
        s,
        r#"<line x1="{m}" y1="{}" x2="{}" y2="{}" stroke="black"/><line x1="{m}" y1="{m}" x2="{m}" y2="{}" stroke="black"/>"#,
        h - m,
        w - m,
        h - m,
        h - m
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">tokens per target forward (k+1 max)</text>"#,
        w / 2.0,
        h - 15.0
    );
    let _ = writeln!(
        s,
        r#"<text x="18" y="{}" text-anchor="middle" transform="rotate(-90 18 {})">pass@1 (%)</text>"#,
        h / 2.0,
        h / 2.0
    );
    for t in 0..=4 {
        let xv = x0 + (x1 - x0) * t as f64 / 4.0;
        let yv = y0 + (y1 - y0) * t as f64 / 4.0;
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{xv:.1}</text><text x="{}" y="{:.1}" text-anchor="end">{yv:.0}</text>"#,
            px(xv),
            h - m + 16.0,
            m - 6.0,
            py(yv) + 4.0
        );
    }
    for (i, r) in rows.iter().enumerate() {
        let _ = writeln!(
            s,
            r#"<circle cx="{:.1}" cy="{:.1}" r="5" fill="steelblue"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            px(xs[i]),
            py(ys[i]),
            px(xs[i]) + 8.0,
            py(ys[i]) - 6.0 - 12.0 * (i % 2) as f64,
            escape(&r.config)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configurations_parse_with_clear_errors() {
        assert_eq!(EvalConfig::parse("target").unwrap().policy, None);
        let c = EvalConfig::parse("judge:threshold=0.3").unwrap();
        assert_eq!(c.policy.as_deref(), Some("judge"));
        assert_eq!(c.params, vec![("threshold".to_string(), 0.3)]);
        assert!(EvalConfig::parse("judge:threshold").is_err());
        assert!(format!("{:#}", EvalConfig::parse("judge:t=x").unwrap_err()).contains("`x`"));
    }
}
