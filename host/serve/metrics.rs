//! Prometheus metrics (`GET /metrics`, OpenMetrics text). Updated from the HTTP tasks and the
//! generation workers; every metric is atomic, so no lock is held across a step.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets, linear_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteStatus {
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabel {
    pub policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyPosition {
    pub policy: String,
    pub position: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    /// `target` or `draft`.
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: String,
}

/// vLLM's label for how a request ended: `stop`, `length` or `abort`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FinishedReason {
    pub finished_reason: String,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RouteStatus, Counter>,
    pub prompt_tokens: Counter,
    pub cached_prompt_tokens: Counter,
    pub completion_tokens: Counter,
    /// Tokens read by `/v1/embeddings` (not generations: they are not in `prompt_tokens`).
    pub embedded_tokens: Counter,
    pub steps: Family<PolicyLabel, Counter>,
    pub drafted: Family<PolicyLabel, Counter>,
    pub accepted: Family<PolicyLabel, Counter>,
    pub accepted_by_position: Family<PolicyPosition, Counter>,
    pub drafted_by_position: Family<PolicyPosition, Counter>,
    pub tokens_per_step: Histogram,
    /// Tokens drafted from requests' predicted outputs, accepted and rejected.
    pub accepted_prediction_tokens: Counter,
    pub rejected_prediction_tokens: Counter,
    pub policy_faults: Family<PolicyLabel, Counter>,
    pub queue_depth: Gauge<i64>,
    /// Positions the prompt cache holds (target and draft model), read at each scrape.
    pub prompt_cache_positions: Gauge<i64>,
    pub active: Gauge<i64>,
    pub ttft_seconds: Histogram,
    /// From arrival to a worker taking the generation up.
    pub queue_seconds: Histogram,
    pub inter_token_seconds: Histogram,
    pub request_seconds: Histogram,
    pub finished: Family<Reason, Counter>,
    /// `finished` by vLLM's name and labels (`vllm:request_success`).
    vllm_finished: Family<FinishedReason, Counter>,
    pub policy_swaps: Counter<u64, AtomicU64>,
    pub policy_call_seconds: Histogram,
    pub batched_forwards: Family<ModelLabel, Counter>,
    pub batched_sequences: Family<ModelLabel, Counter>,
    /// Serialises [`Metrics::sync_batches`] (it adds differences).
    batch_sync: std::sync::Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self::for_model("model")
    }

    /// verdict's metrics (`verdict_*`), and the same counters under vLLM's names for the model
    /// served as `model` ([`Metrics::register_vllm`]).
    pub fn for_model(model: &str) -> Self {
        let mut root = Registry::default();
        let registry = root.sub_registry_with_prefix("verdict");
        let m = Metrics {
            requests: Family::default(),
            prompt_tokens: Counter::default(),
            cached_prompt_tokens: Counter::default(),
            embedded_tokens: Counter::default(),
            completion_tokens: Counter::default(),
            steps: Family::default(),
            drafted: Family::default(),
            accepted: Family::default(),
            accepted_by_position: Family::default(),
            drafted_by_position: Family::default(),
            tokens_per_step: Histogram::new(linear_buckets(1.0, 1.0, 17)),
            accepted_prediction_tokens: Counter::default(),
            rejected_prediction_tokens: Counter::default(),
            policy_faults: Family::default(),
            queue_depth: Gauge::default(),
            prompt_cache_positions: Gauge::default(),
            active: Gauge::default(),
            // 5 ms .. ~80 s
            ttft_seconds: Histogram::new(exponential_buckets(0.005, 2.0, 15)),
            // 1 ms .. ~16 s
            queue_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            // 0.5 ms .. ~8 s
            inter_token_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 15)),
            request_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 15)),
            finished: Family::default(),
            vllm_finished: Family::default(),
            policy_swaps: Counter::default(),
            // 1 us .. ~16 ms: one wasm `verify` call
            policy_call_seconds: Histogram::new(exponential_buckets(1e-6, 2.0, 15)),
            batched_forwards: Family::default(),
            batched_sequences: Family::default(),
            batch_sync: std::sync::Mutex::new(()),
            registry: Registry::default(),
        };
        let r = registry;
        r.register(
            "requests",
            "HTTP requests by route and status",
            m.requests.clone(),
        );
        r.register(
            "prompt_tokens",
            "Prompt tokens of admitted generations",
            m.prompt_tokens.clone(),
        );
        r.register(
            "embedded_tokens",
            "Tokens embedded by /v1/embeddings",
            m.embedded_tokens.clone(),
        );
        r.register(
            "cached_prompt_tokens",
            "Prompt tokens read from the prompt cache instead of prefilled",
            m.cached_prompt_tokens.clone(),
        );
        r.register(
            "completion_tokens",
            "Generated tokens",
            m.completion_tokens.clone(),
        );
        r.register(
            "speculation_steps",
            "Speculation steps by policy",
            m.steps.clone(),
        );
        r.register(
            "drafted_tokens",
            "Drafted tokens by policy",
            m.drafted.clone(),
        );
        r.register(
            "accepted_tokens",
            "Accepted drafted tokens by policy",
            m.accepted.clone(),
        );
        r.register(
            "accepted_by_position",
            "Accepted drafted tokens by policy and draft position (0 = first drafted token)",
            m.accepted_by_position.clone(),
        );
        r.register(
            "drafted_by_position",
            "Drafted tokens by policy and draft position (steps that drafted at least position+1 tokens)",
            m.drafted_by_position.clone(),
        );
        r.register(
            "tokens_per_step",
            "Tokens emitted per speculation step",
            m.tokens_per_step.clone(),
        );
        r.register(
            "accepted_prediction_tokens",
            "Tokens drafted from requests' predicted outputs (OpenAI's prediction) and accepted",
            m.accepted_prediction_tokens.clone(),
        );
        r.register(
            "rejected_prediction_tokens",
            "Tokens drafted from requests' predicted outputs and rejected",
            m.rejected_prediction_tokens.clone(),
        );
        r.register(
            "policy_faults",
            "Policy faults (trap, fuel, deadline, bad verdict) answered by the strict fallback",
            m.policy_faults.clone(),
        );
        r.register(
            "policy_call_seconds",
            "Latency of one policy verify call (wasm, including fault handling)",
            m.policy_call_seconds.clone(),
        );
        r.register(
            "prompt_cache_positions",
            "Positions (target and draft model) held by the prompt cache",
            m.prompt_cache_positions.clone(),
        );
        r.register(
            "queue_depth",
            "Requests waiting for a generation worker",
            m.queue_depth.clone(),
        );
        r.register(
            "active_generations",
            "Generations running on workers",
            m.active.clone(),
        );
        r.register(
            "time_to_first_token_seconds",
            "From request arrival to the first token",
            m.ttft_seconds.clone(),
        );
        r.register(
            "queue_seconds",
            "From request arrival to a worker starting its generation",
            m.queue_seconds.clone(),
        );
        r.register(
            "inter_token_seconds",
            "Time between consecutive tokens",
            m.inter_token_seconds.clone(),
        );
        r.register(
            "request_seconds",
            "Generation request latency, arrival to last token",
            m.request_seconds.clone(),
        );
        r.register(
            "generations_finished",
            "Generations by how they ended",
            m.finished.clone(),
        );
        r.register(
            "policy_swaps",
            "Policies uploaded or removed at run time",
            m.policy_swaps.clone(),
        );
        r.register(
            "batched_forwards",
            "Forwards run by a model's batcher (each over one or more requests' sequences)",
            m.batched_forwards.clone(),
        );
        r.register(
            "batched_sequences",
            "Sequences in those forwards (divided by batched_forwards: the mean batch size)",
            m.batched_sequences.clone(),
        );
        m.register_vllm(
            root.sub_registry_with_label(("model_name".into(), model.to_string().into())),
        );
        Metrics {
            registry: root,
            ..m
        }
    }

    /// vLLM's names (`vllm:...`, labelled `model_name`) for the metrics that mean the same here,
    /// so dashboards and load-aware routers written for vLLM read verdict unchanged. The
    /// instances are shared: nothing is counted twice. Speculation counts keep their `policy`
    /// label (vLLM's sums over it). vLLM's KV-cache usage has no counterpart: each generation
    /// holds its own cache, grown as it goes.
    fn register_vllm(&self, r: &mut Registry) {
        r.register(
            "vllm:num_requests_running",
            "Requests generating (verdict_active_generations)",
            self.active.clone(),
        );
        r.register(
            "vllm:num_requests_waiting",
            "Requests waiting for a worker (verdict_queue_depth)",
            self.queue_depth.clone(),
        );
        r.register(
            "vllm:prompt_tokens",
            "Prompt tokens (verdict_prompt_tokens)",
            self.prompt_tokens.clone(),
        );
        r.register(
            "vllm:generation_tokens",
            "Generated tokens (verdict_completion_tokens)",
            self.completion_tokens.clone(),
        );
        r.register(
            "vllm:prefix_cache_queries",
            "Prompt tokens looked up in the prompt cache (verdict_prompt_tokens)",
            self.prompt_tokens.clone(),
        );
        r.register(
            "vllm:prefix_cache_hits",
            "Prompt tokens found in the prompt cache (verdict_cached_prompt_tokens)",
            self.cached_prompt_tokens.clone(),
        );
        r.register(
            "vllm:time_to_first_token_seconds",
            "From arrival to the first token (verdict_time_to_first_token_seconds)",
            self.ttft_seconds.clone(),
        );
        r.register(
            "vllm:request_queue_time_seconds",
            "Waiting for a worker (verdict_queue_seconds)",
            self.queue_seconds.clone(),
        );
        r.register(
            "vllm:inter_token_latency_seconds",
            "Between consecutive tokens (verdict_inter_token_seconds)",
            self.inter_token_seconds.clone(),
        );
        r.register(
            "vllm:e2e_request_latency_seconds",
            "From arrival to the last token (verdict_request_seconds)",
            self.request_seconds.clone(),
        );
        r.register(
            "vllm:request_success",
            "Finished requests by how they ended: stop, length, abort (verdict_generations_finished)",
            self.vllm_finished.clone(),
        );
        r.register(
            "vllm:spec_decode_num_drafts",
            "Speculation steps (verdict_speculation_steps)",
            self.steps.clone(),
        );
        r.register(
            "vllm:spec_decode_num_draft_tokens",
            "Drafted tokens (verdict_drafted_tokens)",
            self.drafted.clone(),
        );
        r.register(
            "vllm:spec_decode_num_accepted_tokens",
            "Accepted drafted tokens (verdict_accepted_tokens)",
            self.accepted.clone(),
        );
        r.register(
            "vllm:spec_decode_num_accepted_tokens_per_pos",
            "Accepted drafted tokens by draft position (verdict_accepted_by_position)",
            self.accepted_by_position.clone(),
        );
    }

    /// Brings the batch counters up to a model's batcher statistics (called before encoding).
    pub fn sync_batches(&self, model: &str, stats: crate::models::BatchStats) {
        let _guard = self.batch_sync.lock().unwrap_or_else(|p| p.into_inner());
        let label = ModelLabel {
            model: model.to_string(),
        };
        for (family, now) in [
            (&self.batched_forwards, stats.forwards),
            (&self.batched_sequences, stats.sequences),
        ] {
            let c = family.get_or_create(&label);
            c.inc_by(now.saturating_sub(c.get()));
        }
    }

    pub fn request(&self, route: &str, status: u16) {
        self.requests
            .get_or_create(&RouteStatus {
                route: route.to_string(),
                status,
            })
            .inc();
    }

    pub fn finished(&self, reason: &str) {
        self.finished
            .get_or_create(&Reason {
                reason: reason.to_string(),
            })
            .inc();
        // vLLM counts a request its client dropped as aborted, and has no failed ones.
        let vllm = match reason {
            "stop" | "length" => reason,
            "cancelled" => "abort",
            _ => return,
        };
        self.vllm_finished
            .get_or_create(&FinishedReason {
                finished_reason: vllm.to_string(),
            })
            .inc();
    }

    /// OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }
}
