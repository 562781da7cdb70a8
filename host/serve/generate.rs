//! One request's generation, run on a pool worker: start it on the engine, step until it ends,
//! turn tokens into text (UTF-8 safe, stop strings applied) and send events to the HTTP side.
//! A closed event channel means the client went away: the generation stops at the next step.

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use tokio::sync::mpsc::UnboundedSender;

use super::error::ApiError;
use super::http::Served;
use super::logprobs::{self, Aligner, Naming, TokenEntry};
use super::metrics::{Metrics, PolicyLabel, PolicyPosition};
use super::stop::StopMatcher;
use crate::engine::{FinishReason, GenerateRequest, SpecStats};
use crate::sample::{GrammarError, NoTokenAllowed};

/// What a generation reports to its HTTP handler, in order: `Started` or `Failed`, then
/// `Delta`s, then `Done` (or `Failed`).
#[derive(Debug)]
pub enum Event {
    Started,
    /// The prompt is read and its sequences are in the prompt cache (`Job::share_prompt`).
    Prefilled,
    /// New text, and the logprobs of the tokens it completes (empty unless the request asked;
    /// see [`super::logprobs`] for how they line up with held-back text).
    Delta(String, Vec<TokenEntry>),
    /// The prompt's tokens and those generated so far (sent before the `Delta` of a step's
    /// text), for the usage of each streamed chunk (`stream_options.continuous_usage_stats`),
    /// and the tokens generated since the last `Progress` when the request asked for them
    /// (vLLM's `return_token_ids`; the `Done` outcome holds those not sent yet).
    Progress {
        prompt: usize,
        completion: usize,
        tokens: Vec<u32>,
    },
    /// vLLM's `prompt_logprobs` ([`logprobs::prompt_json`]), once the prefill has scored the
    /// prompt, before `Done`.
    PromptLogprobs(serde_json::Value),
    Done(Box<Outcome>),
    Failed(ApiError),
}

#[derive(Debug, Clone)]
pub struct Outcome {
    /// OpenAI's `finish_reason`: "stop" (EOS or a stop string) or "length".
    pub finish_reason: &'static str,
    /// The stop string that ended the output (vLLM's `stop_reason`, Anthropic's
    /// `stop_sequence`).
    pub stop_sequence: Option<String>,
    /// The token of the request's `stop_token_ids` that ended the output (vLLM's
    /// `stop_reason` then; not an EOS token).
    pub stop_token: Option<u32>,
    pub prompt_tokens: usize,
    /// Prompt tokens read from the prompt cache instead of prefilled.
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    /// With `return_token_ids` (else empty): the generated tokens, `completion_tokens` of them,
    /// then the stop token that ended the output (EOS or one of `stop_token_ids`), as vLLM's
    /// `token_ids` hold it.
    pub token_ids: Vec<u32>,
    /// The target's mean log-probability per generated token, the ending one included
    /// ([`crate::engine::Generation::mean_logprob`]): what `best_of` ranks by.
    pub mean_logprob: Option<f64>,
    pub speculation: SpeculationReport,
}

/// The `speculation` field of every response.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct SpeculationReport {
    /// `name@version`; null when the request ran without speculation.
    pub policy: Option<String>,
    /// `model`, `prompt-lookup[:N]`, `self:N` or `auto`; null without speculation.
    pub drafter: Option<String>,
    pub steps: u64,
    pub drafted: u64,
    pub accepted: u64,
    /// `accepted_per_position[i]`: steps whose (i+1)-th drafted token was accepted.
    pub accepted_per_position: Vec<u64>,
    /// `drafted_per_position[i]`: steps that drafted an (i+1)-th token.
    pub drafted_per_position: Vec<u64>,
    /// Generated tokens per target forward after the prefill (1.0 without speculation).
    pub tokens_per_step: f64,
    pub policy_faults: u64,
    /// Accepted drafted tokens that were not the target's argmax: what a lossy policy kept
    /// beyond strict greedy verification (0 for strict at T = 0).
    pub accepted_off_argmax: u64,
    /// The target's mean log-probability (T = 1) of the generated tokens: how likely the target
    /// finds the output, whatever policy produced it.
    pub mean_target_logprob: f64,
    /// Speculative steps by the drafter that proposed them (`auto` picks one per step).
    pub drafter_steps: std::collections::BTreeMap<String, u64>,
    /// With a predicted output: the tokens drafted from it that were accepted, and rejected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accepted_prediction_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rejected_prediction_tokens: Option<u64>,
}

impl Outcome {
    /// vLLM's `stop_reason`: the stop string, or the stop token id, that ended the output
    /// (null at an EOS token, a length limit or a grammar's end).
    pub fn stop_reason(&self) -> serde_json::Value {
        match (&self.stop_sequence, self.stop_token) {
            (Some(s), _) => serde_json::json!(s),
            (None, Some(t)) => serde_json::json!(t),
            (None, None) => serde_json::Value::Null,
        }
    }

    /// One request's outcome from its choices', each a generation of its own, `per_prompt`
    /// (`n`) choices to each of its prompts in turn: each prompt counted once, completion tokens
    /// and speculation summed.
    pub fn total(choices: &[&Outcome], per_prompt: usize) -> Option<Outcome> {
        let first = choices.first()?;
        let groups = || choices.chunks(per_prompt.max(1));
        Some(Outcome {
            finish_reason: first.finish_reason,
            stop_sequence: first.stop_sequence.clone(),
            stop_token: first.stop_token,
            prompt_tokens: groups().map(|g| g[0].prompt_tokens).sum(),
            cached_tokens: groups()
                .map(|g| g.iter().map(|o| o.cached_tokens).max().unwrap_or(0))
                .sum(),
            completion_tokens: choices.iter().map(|o| o.completion_tokens).sum(),
            token_ids: Vec::new(),
            mean_logprob: None,
            speculation: SpeculationReport::total(
                &choices
                    .iter()
                    .map(|o| (&o.speculation, o.completion_tokens))
                    .collect::<Vec<_>>(),
            ),
        })
    }
}

impl SpeculationReport {
    /// The sum of several generations' reports (with their generated token counts): counts add
    /// up, the ratios are recomputed over the whole.
    fn total(reports: &[(&SpeculationReport, usize)]) -> SpeculationReport {
        fn add(into: &mut Vec<u64>, xs: &[u64]) {
            if into.len() < xs.len() {
                into.resize(xs.len(), 0);
            }
            into.iter_mut().zip(xs).for_each(|(a, b)| *a += b);
        }
        let mut t = SpeculationReport {
            policy: reports.first().and_then(|r| r.0.policy.clone()),
            drafter: reports.first().and_then(|r| r.0.drafter.clone()),
            steps: 0,
            drafted: 0,
            accepted: 0,
            accepted_per_position: Vec::new(),
            drafted_per_position: Vec::new(),
            tokens_per_step: 0.0,
            policy_faults: 0,
            accepted_off_argmax: 0,
            mean_target_logprob: 0.0,
            drafter_steps: Default::default(),
            accepted_prediction_tokens: None,
            rejected_prediction_tokens: None,
        };
        let sum = |f: fn(&SpeculationReport) -> Option<u64>| {
            let got: Vec<u64> = reports.iter().filter_map(|r| f(r.0)).collect();
            (!got.is_empty()).then(|| got.iter().sum())
        };
        t.accepted_prediction_tokens = sum(|r| r.accepted_prediction_tokens);
        t.rejected_prediction_tokens = sum(|r| r.rejected_prediction_tokens);
        let (mut stepped_tokens, mut logprob, mut tokens) = (0.0, 0.0, 0usize);
        for &(r, n) in reports {
            t.steps += r.steps;
            t.drafted += r.drafted;
            t.accepted += r.accepted;
            add(&mut t.accepted_per_position, &r.accepted_per_position);
            add(&mut t.drafted_per_position, &r.drafted_per_position);
            t.policy_faults += r.policy_faults;
            t.accepted_off_argmax += r.accepted_off_argmax;
            for (k, v) in &r.drafter_steps {
                *t.drafter_steps.entry(k.clone()).or_default() += v;
            }
            stepped_tokens += r.tokens_per_step * r.steps as f64;
            logprob += r.mean_target_logprob * n as f64;
            tokens += n;
        }
        if t.steps > 0 {
            t.tokens_per_step = stepped_tokens / t.steps as f64;
        }
        if tokens > 0 {
            t.mean_target_logprob = logprob / tokens as f64;
        }
        t
    }

    fn new(stats: &SpecStats) -> Self {
        SpeculationReport {
            policy: stats.policy.clone(),
            drafter: stats.drafter.clone(),
            steps: stats.steps,
            drafted: stats.drafted,
            accepted: stats.accepted,
            accepted_per_position: stats.accepted_per_position.clone(),
            drafted_per_position: stats.drafted_per_position.clone(),
            tokens_per_step: stats.tokens_per_step(),
            policy_faults: stats.policy_faults,
            accepted_off_argmax: stats.accepted_off_argmax,
            mean_target_logprob: stats.mean_target_logprob(),
            drafter_steps: stats.drafter_steps.clone(),
            accepted_prediction_tokens: stats.prediction.then_some(stats.prediction_accepted),
            rejected_prediction_tokens: stats.prediction.then_some(stats.prediction_rejected),
        }
    }
}

pub struct Job {
    pub served: Arc<Served>,
    /// The engine the request chose (the base model's, or a LoRA module's).
    pub engine: crate::engine::Engine,
    pub request: GenerateRequest,
    pub stop: Vec<String>,
    pub arrived: Instant,
    pub events: UnboundedSender<Event>,
    pub metrics: Arc<Metrics>,
    /// Send the prompt's text (and, with logprobs, its scored tokens) before the output.
    pub echo: bool,
    /// End-of-generation tokens are output like any other.
    pub ignore_eos: bool,
    /// After the prefill, put a copy of the prompt's sequences into the prompt cache and send
    /// `Prefilled` (the other choices of its request then start from it).
    pub share_prompt: bool,
    /// Special tokens stay in the text (a reply to a request with tools marks its calls with
    /// them: `<tool_call>`).
    pub keep_special: bool,
    /// The request field that set its grammar: a grammar that fails while generating is the
    /// request's error, named by it.
    pub grammar_field: Option<&'static str>,
    /// The field named when the request's masks leave no token ([`NoTokenAllowed`]); `None`:
    /// it set no mask, so such a row is the model's failure.
    pub mask_field: Option<&'static str>,
    /// The stop string that ends the output is sent with it.
    pub include_stop: bool,
    /// Logprobs name tokens `token_id:N`.
    pub tokens_as_ids: bool,
    /// The request's own stop tokens (vLLM's `stop_token_ids`): one that ends the output is
    /// its `stop_reason`.
    pub stop_token_ids: Vec<u32>,
    /// vLLM's `prompt_logprobs`: send the prompt's scores with this many alternatives (the
    /// engine request scores it with at least as many).
    pub prompt_logprobs: Option<usize>,
    /// vLLM's `return_token_ids`: `Progress` carries the new tokens.
    pub token_ids: bool,
}

/// Counters already added to the metrics, so each step adds only its difference.
#[derive(Default)]
struct Seen {
    steps: u64,
    drafted: u64,
    accepted: u64,
    faults: u64,
    accepted_pos: Vec<u64>,
    drafted_pos: Vec<u64>,
    prediction: (u64, u64),
}

fn add_by_position(
    family: &prometheus_client::metrics::family::Family<
        PolicyPosition,
        prometheus_client::metrics::counter::Counter,
    >,
    policy: &str,
    now: &[u64],
    before: &mut Vec<u64>,
) {
    for (i, &n) in now.iter().enumerate() {
        let b = before.get(i).copied().unwrap_or(0);
        if n > b {
            family
                .get_or_create(&PolicyPosition {
                    policy: policy.to_string(),
                    position: i as u32,
                })
                .inc_by(n - b);
        }
    }
    before.clone_from(&now.to_vec());
}

impl Seen {
    fn publish(&mut self, m: &Metrics, s: &SpecStats) {
        // Plain decoding has no policy: its steps are counted under "none".
        let policy = s.policy.as_deref().unwrap_or("none");
        let label = PolicyLabel {
            policy: policy.to_string(),
        };
        m.steps
            .get_or_create(&label)
            .inc_by(s.steps.saturating_sub(self.steps));
        m.drafted
            .get_or_create(&label)
            .inc_by(s.drafted.saturating_sub(self.drafted));
        m.accepted
            .get_or_create(&label)
            .inc_by(s.accepted.saturating_sub(self.accepted));
        let faults = s.policy_faults.saturating_sub(self.faults);
        if faults > 0 {
            m.policy_faults.get_or_create(&label).inc_by(faults);
        }
        add_by_position(
            &m.accepted_by_position,
            policy,
            &s.accepted_per_position,
            &mut self.accepted_pos,
        );
        add_by_position(
            &m.drafted_by_position,
            policy,
            &s.drafted_per_position,
            &mut self.drafted_pos,
        );
        m.accepted_prediction_tokens
            .inc_by(s.prediction_accepted.saturating_sub(self.prediction.0));
        m.rejected_prediction_tokens
            .inc_by(s.prediction_rejected.saturating_sub(self.prediction.1));
        self.prediction = (s.prediction_accepted, s.prediction_rejected);
        self.steps = s.steps;
        self.drafted = s.drafted;
        self.accepted = s.accepted;
        self.faults = s.policy_faults;
    }
}

impl Job {
    /// Runs to the end (or until the client leaves). Never panics on bad input; engine errors
    /// become a `Failed` event.
    pub fn run(self) {
        let Job {
            served,
            engine,
            request,
            stop,
            arrived,
            events,
            metrics,
            echo,
            ignore_eos,
            mut share_prompt,
            keep_special,
            grammar_field,
            mask_field,
            include_stop,
            tokens_as_ids,
            stop_token_ids,
            prompt_logprobs,
            token_ids,
        } = self;
        if events.is_closed() {
            metrics.finished("cancelled");
            return;
        }
        // (A choice that reads its prompt from another's waits for that prefill too.)
        metrics
            .queue_seconds
            .observe(arrived.elapsed().as_secs_f64());
        let prompt_tokens = request.prompt.len();
        let max_tokens = request.max_tokens;
        let naming = if tokens_as_ids {
            Naming::Ids
        } else {
            Naming::Text
        };
        let mut aligner = request.logprobs.is_some().then(|| Aligner::new(naming));
        let echo_top = request.logprobs.unwrap_or(0);
        let mut echo_prompt = echo.then(|| request.prompt.clone());
        let mut scored_prompt = prompt_logprobs.map(|top| (request.prompt.clone(), top));
        let mut generation = match engine.start(request) {
            Ok(g) => g,
            Err(e) => {
                let err = match e.param {
                    Some(p) => ApiError::invalid(p, e.message),
                    None => ApiError::bad_request(e.message),
                };
                let _ = events.send(Event::Failed(err));
                return;
            }
        };
        metrics.prompt_tokens.inc_by(prompt_tokens as u64);
        let cached_tokens = generation.cached_prompt_tokens();
        metrics.cached_prompt_tokens.inc_by(cached_tokens as u64);
        if events.send(Event::Started).is_err() {
            metrics.finished("cancelled");
            return;
        }
        let tokenizer = &*served.tokenizer;
        let mut text = tokenizer.stream(!keep_special);
        let mut stopper = StopMatcher::new(stop).including_stop(include_stop);
        let mut seen = Seen::default();
        let mut produced = 0usize;
        // With `token_ids`: the generated tokens, and those not yet sent in a `Progress`.
        let mut output = Vec::new();
        let mut unsent = Vec::new();
        let mut last_emit: Option<Instant> = None;
        let mut stop_sequence = None;
        let finish_reason = 'steps: loop {
            if events.is_closed() {
                seen.publish(&metrics, generation.stats());
                metrics.completion_tokens.inc_by(produced as u64);
                metrics.finished("cancelled");
                return;
            }
            // A long prompt's prefill (the steps before the first token) stops between its
            // chunks once the client has gone.
            let step = if last_emit.is_none() {
                let gone = events.clone();
                crate::models::batch::interruptible(move || gone.is_closed(), || generation.step())
            } else {
                generation.step()
            };
            let tokens = match step {
                Ok(t) => t,
                Err(_) if events.is_closed() => {
                    seen.publish(&metrics, generation.stats());
                    metrics.completion_tokens.inc_by(produced as u64);
                    metrics.finished("cancelled");
                    return;
                }
                Err(e) => {
                    seen.publish(&metrics, generation.stats());
                    metrics.finished("error");
                    let grammar = e.chain().find_map(|c| c.downcast_ref::<GrammarError>());
                    let masked = e.chain().find_map(|c| c.downcast_ref::<NoTokenAllowed>());
                    let err = match (grammar, masked) {
                        (Some(g), _) => {
                            tracing::warn!("a request's grammar failed: {g}");
                            let field = grammar_field.unwrap_or("grammar");
                            ApiError::invalid(field, format!("{field}: {g}"))
                        }
                        (None, Some(m)) if let Some(field) = mask_field => {
                            ApiError::invalid(field, m.to_string())
                        }
                        _ => {
                            tracing::error!("generation step failed: {e:#}");
                            ApiError::internal(format!("generation failed: {e:#}"))
                        }
                    };
                    let _ = events.send(Event::Failed(err));
                    return;
                }
            };
            // After the first step (the prefill), once.
            if std::mem::take(&mut share_prompt) {
                if let Err(e) = generation.share_prompt() {
                    tracing::warn!("cannot share the prompt's sequences: {e:#}");
                }
                let _ = events.send(Event::Prefilled);
            }
            // The prompt's scores (empty after the prefill, or when not asked for).
            let scored = generation.take_prompt_logprobs();
            if let Some((prompt, top)) = scored_prompt.take() {
                let json = logprobs::prompt_json(&served.tokenizer, &prompt, &scored, top, naming);
                let _ = events.send(Event::PromptLogprobs(json));
            }
            // The echoed prompt goes first; the output's text offsets then count from its end.
            if let Some(prompt) = echo_prompt.take() {
                match logprobs::echo_entries(&served.tokenizer, &prompt, &scored, echo_top, naming)
                {
                    Ok((text, entries)) => {
                        let entries = match aligner.as_mut() {
                            Some(a) => {
                                a.start_after(text.chars().count());
                                entries
                            }
                            None => Vec::new(),
                        };
                        let counts = (prompt_tokens, 0);
                        let _ = send_delta(&events, counts, &mut unsent, text, entries);
                    }
                    Err(e) => {
                        metrics.finished("error");
                        let _ = events.send(Event::Failed(ApiError::internal(format!(
                            "cannot decode the prompt: {e:#}"
                        ))));
                        return;
                    }
                }
            }
            // One per token in `tokens` (when the request asked for logprobs).
            let logprobs = generation.take_logprobs();
            seen.publish(&metrics, generation.stats());
            if let Some(s) = generation.take_policy_latency() {
                metrics.policy_call_seconds.observe(s);
            }
            if !tokens.is_empty() {
                metrics.tokens_per_step.observe(tokens.len() as f64);
                let now = Instant::now();
                match last_emit {
                    None => metrics
                        .ttft_seconds
                        .observe(now.duration_since(arrived).as_secs_f64()),
                    Some(t) => {
                        let gap = now.duration_since(t).as_secs_f64() / tokens.len() as f64;
                        for _ in 0..tokens.len() {
                            metrics.inter_token_seconds.observe(gap);
                        }
                    }
                }
                last_emit = Some(now);
            }
            let mut delta = String::new();
            let mut ended = None;
            for (i, &t) in tokens.iter().enumerate() {
                if produced >= max_tokens {
                    ended = Some("length");
                    break;
                }
                produced += 1;
                if token_ids {
                    output.push(t);
                    unsent.push(t);
                }
                if !ignore_eos && tokenizer.is_eos(t) {
                    ended = Some("stop");
                    break;
                }
                let piece = match text.push(tokenizer, t) {
                    Ok(p) => p,
                    Err(e) => {
                        metrics.finished("error");
                        let _ = events.send(Event::Failed(ApiError::internal(format!(
                            "cannot decode token {t}: {e:#}"
                        ))));
                        return;
                    }
                };
                if let (Some(a), Some(lp)) = (aligner.as_mut(), logprobs.get(i)) {
                    a.pushed(tokenizer, lp, &piece, text.is_pending());
                }
                let pushed = stopper.push(&piece);
                delta.push_str(&pushed.emit);
                if let Some(a) = aligner.as_mut() {
                    a.emitted(&pushed.emit);
                }
                if pushed.stop.is_some() {
                    stop_sequence = pushed.stop;
                    let entries = release(&mut aligner, Aligner::release_stopped);
                    let counts = (prompt_tokens, produced);
                    let text = std::mem::take(&mut delta);
                    let _ = send_delta(&events, counts, &mut unsent, text, entries);
                    break 'steps "stop";
                }
            }
            if ended.is_none() {
                ended = match generation.finished() {
                    Some(FinishReason::Stop) => Some("stop"),
                    Some(FinishReason::Length) => Some("length"),
                    None if produced >= max_tokens => Some("length"),
                    None => None,
                };
            }
            if let Some(reason) = ended {
                // What the decoder and the stop matcher still hold belongs to the output.
                let tail = stopper.push(&text.finish());
                let rest = stopper.finish();
                if let Some(a) = aligner.as_mut() {
                    a.emitted(&tail.emit);
                    a.emitted(&rest);
                }
                delta.push_str(&tail.emit);
                delta.push_str(&rest);
                let entries = if tail.stop.is_some() {
                    stop_sequence = tail.stop;
                    release(&mut aligner, Aligner::release_stopped)
                } else {
                    release(&mut aligner, Aligner::release_all)
                };
                let counts = (prompt_tokens, produced);
                let _ = send_delta(&events, counts, &mut unsent, delta, entries);
                break reason;
            }
            let entries = release(&mut aligner, Aligner::release);
            let counts = (prompt_tokens, produced);
            if send_delta(&events, counts, &mut unsent, delta, entries).is_err() {
                // The client left; the check at the top of the loop records it.
                continue;
            }
        };
        let stats = generation.stats();
        seen.publish(&metrics, stats);
        metrics.completion_tokens.inc_by(produced as u64);
        metrics
            .request_seconds
            .observe(arrived.elapsed().as_secs_f64());
        metrics.finished(finish_reason);
        let speculation = SpeculationReport::new(stats);
        let seconds = arrived.elapsed().as_secs_f64();
        tracing::info!(
            target: "verdict::requests",
            "generation ended ({finish_reason}): {prompt_tokens} prompt tokens ({cached_tokens} cached), {produced} generated in {seconds:.2} s, {:.2} per step",
            speculation.tokens_per_step
        );
        // A stop token of the request's own ends it with that token as the reason (an EOS
        // token, unless EOS is ignored, is a plain end).
        let stop_token = generation
            .stopped_by()
            .filter(|_| finish_reason == "stop" && stop_sequence.is_none())
            .filter(|t| stop_token_ids.contains(t) && (ignore_eos || !tokenizer.is_eos(*t)));
        if token_ids && finish_reason == "stop" && stop_sequence.is_none() {
            output.extend(generation.stopped_by());
        }
        let mean_logprob = generation.mean_logprob();
        // The sequences go to the prompt cache before the client hears the end, so that its
        // next turn finds them.
        generation.close();
        let _ = events.send(Event::Done(Box::new(Outcome {
            finish_reason,
            stop_sequence,
            stop_token,
            prompt_tokens,
            cached_tokens,
            completion_tokens: produced,
            token_ids: output,
            mean_logprob,
            speculation,
        })));
    }
}

/// Sends new text and its logprobs (nothing when both are empty), after the token counts so far
/// (prompt, generated) and the `unsent` tokens. An error: the client has gone.
fn send_delta(
    events: &UnboundedSender<Event>,
    (prompt, completion): (usize, usize),
    unsent: &mut Vec<u32>,
    text: String,
    entries: Vec<TokenEntry>,
) -> Result<(), ()> {
    if text.is_empty() && entries.is_empty() {
        return Ok(());
    }
    let tokens = std::mem::take(unsent);
    events
        .send(Event::Progress {
            prompt,
            completion,
            tokens,
        })
        .map_err(|_| ())?;
    events.send(Event::Delta(text, entries)).map_err(|_| ())
}

/// The logprobs to send with a delta (none when the request did not ask).
fn release(
    aligner: &mut Option<Aligner>,
    how: impl FnOnce(&mut Aligner) -> Vec<TokenEntry>,
) -> Vec<TokenEntry> {
    aligner.as_mut().map(how).unwrap_or_default()
}
