// The per-step hot path of speculative decoding on the GPU: from the target's k + 1 logit rows to
// the few numbers per position that a policy sees (DESIGN.md, "One speculation step", 3), and the
// token after the accepted prefix (residual or bonus draw), without copying [k + 1, V] rows to the
// host. The CPU twin, which these kernels must match, is host/verify/mod.rs (features, top-K,
// entropy), host/sample/mod.rs (softmax, residual, sampling) and host/verify/judge.rs (the judge
// dot product); the Rust side is host/verify/cuda.rs.
//
// One block per row, BLOCK threads, every reduction in a fixed order: results are deterministic.
// Sums run in double like the CPU's; exp/log of single values in float like the CPU's, so results
// agree to a few ulps (expf vs Rust's f32::exp).

#define BLOCK 1024
#define WARPS (BLOCK / 32)
// The reductions finish in one warp: one lane per warp of the block.
static_assert(WARPS == 32, "BLOCK must be 1024 threads");

// (value, id) ordered as the CPU's top-K and argmax order them: larger value first, then lower id.
struct Entry {
    float v;
    unsigned int id;
};

__device__ __forceinline__ bool before(Entry a, Entry b) {
    return a.v > b.v || (a.v == b.v && a.id < b.id);
}

// The best entry of the block (every thread gets it). `scratch` holds WARPS entries.
__device__ Entry block_best(Entry e, Entry* scratch) {
    for (int off = 16; off > 0; off >>= 1) {
        Entry o;
        o.v = __shfl_down_sync(0xffffffffu, e.v, off);
        o.id = __shfl_down_sync(0xffffffffu, e.id, off);
        if (before(o, e)) e = o;
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) scratch[warp] = e;
    __syncthreads();
    if (warp == 0) {
        e = scratch[lane];
        for (int off = 16; off > 0; off >>= 1) {
            Entry o;
            o.v = __shfl_down_sync(0xffffffffu, e.v, off);
            o.id = __shfl_down_sync(0xffffffffu, e.id, off);
            if (before(o, e)) e = o;
        }
        if (lane == 0) scratch[0] = e;
    }
    __syncthreads();
    Entry best = scratch[0];
    __syncthreads();
    return best;
}

// The block's sum (every thread gets it), in a fixed order. `scratch` holds WARPS doubles.
__device__ double block_sum(double x, double* scratch) {
    for (int off = 16; off > 0; off >>= 1) x += __shfl_down_sync(0xffffffffu, x, off);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    if (warp == 0) {
        x = scratch[lane];
        for (int off = 16; off > 0; off >>= 1) x += __shfl_down_sync(0xffffffffu, x, off);
        if (lane == 0) scratch[0] = x;
    }
    __syncthreads();
    double total = scratch[0];
    __syncthreads();
    return total;
}

// Per-position features for `rows` logit rows (grid: one block per row, BLOCK threads).
//
// logits [rows, vocab]: the target's rows; row i scores drafted position i, row rows - 1 is the
//   bonus position.
// inv_t: 1 / temperature (the features' temperature: 1 at greedy, see verify::feature_params).
// probs [rows, vocab] out: softmax(logits / T), as sample::probabilities computes it.
// argmax [rows] out: sample::argmax of each logit row (greedy decisions, off-argmax statistics).
// entropy [rows] out: H(p) in nats.
// top_ids, top_probs [rows, top_k] out: the top_k largest (id, p), most likely first, ties by id.
// tokens [drafted]: the drafted tokens x_i, drafted <= rows; target_prob [drafted] out: p_i(x_i).
// q [drafted, vocab] or null: the draft's distributions; draft_prob [drafted] out: q_i(x_i).
// hidden [.., hidden_size] or null: the target's last hidden states; judge [drafted] out:
//   hidden[i + judge_row0] . judge_w + judge_b (the judge head, standardisation folded in).
// max_logit, log_z [rows] out: each row's largest logit m and ln sum exp(logits - m) at
//   temperature 1 (so sample::log_sum_exp = m + log_z), and token_logit [drafted] out:
//   logits[i][x_i]; with them the engine scores emitted tokens (the target's log-likelihood)
//   without the rows on the host.
extern "C" __global__ void __launch_bounds__(BLOCK) step_features(
    const float* __restrict__ logits, unsigned int rows, unsigned int vocab, float inv_t,
    float* __restrict__ probs, unsigned int* __restrict__ argmax, float* __restrict__ entropy,
    unsigned int top_k, unsigned int* __restrict__ top_ids, float* __restrict__ top_probs,
    const unsigned int* __restrict__ tokens, unsigned int drafted, float* __restrict__ target_prob,
    const float* __restrict__ q, float* __restrict__ draft_prob, const float* __restrict__ hidden,
    unsigned int hidden_size, unsigned int judge_row0, const float* __restrict__ judge_w,
    float judge_b, float* __restrict__ judge, float* __restrict__ max_logit,
    float* __restrict__ log_z, float* __restrict__ token_logit) {
    __shared__ Entry best_scratch[WARPS];
    __shared__ double sum_scratch[WARPS];
    const unsigned int row = blockIdx.x;
    if (row >= rows) return;
    const float* l = logits + (size_t)row * vocab;
    float* p = probs + (size_t)row * vocab;

    // argmax: the first maximum; NaN and -inf never win, so an all -inf row gives id 0.
    Entry e = {-INFINITY, 0u};
    for (unsigned int j = threadIdx.x; j < vocab; j += BLOCK) {
        Entry c = {l[j], j};
        if (c.v > -INFINITY && before(c, e)) e = c;
    }
    const Entry top1 = block_best(e, best_scratch);
    const float max = top1.v;
    if (threadIdx.x == 0) argmax[row] = top1.id;

    // softmax at the temperature; a row without a finite maximum is one-hot at its argmax.
    const bool finite = isfinite(max);
    const bool unit_t = inv_t == 1.0f;
    double sum = 0.0, sum1 = 0.0;  // at the temperature, and at 1 (the same when T = 1)
    if (finite) {
        for (unsigned int j = threadIdx.x; j < vocab; j += BLOCK) {
            float x = expf((l[j] - max) * inv_t);
            sum += isfinite(x) ? (double)x : 0.0;
            if (!unit_t) {
                float y = expf(l[j] - max);
                sum1 += isfinite(y) ? (double)y : 0.0;
            }
        }
    }
    sum = block_sum(sum, sum_scratch);
    sum1 = unit_t ? sum : block_sum(sum1, sum_scratch);
    if (threadIdx.x == 0) {
        max_logit[row] = max;
        log_z[row] = finite ? (float)log(sum1) : 0.0f;
    }
    const float inv = finite ? (float)(1.0 / sum) : 0.0f;
    double plogp = 0.0;
    for (unsigned int j = threadIdx.x; j < vocab; j += BLOCK) {
        float x;
        if (finite) {
            x = expf((l[j] - max) * inv_t);
            x = isfinite(x) ? x * inv : 0.0f;
        } else {
            x = j == top1.id ? 1.0f : 0.0f;
        }
        p[j] = x;
        if (x > 0.0f) plogp += (double)x * log((double)x);
    }
    plogp = block_sum(plogp, sum_scratch);  // also orders the p[] writes before the reads below
    if (threadIdx.x == 0) entropy[row] = (float)(-plogp);

    // top-K: K rounds, each the best entry strictly after the previous one in (p desc, id asc).
    Entry prev = {INFINITY, 0u};
    const unsigned int k = top_k < vocab ? top_k : vocab;
    for (unsigned int r = 0; r < k; ++r) {
        Entry b = {-INFINITY, 0xffffffffu};  // p >= 0: any entry beats it
        for (unsigned int j = threadIdx.x; j < vocab; j += BLOCK) {
            Entry c = {p[j], j};
            if (before(prev, c) && before(c, b)) b = c;
        }
        prev = block_best(b, best_scratch);
        if (threadIdx.x == 0) {
            top_ids[(size_t)row * top_k + r] = prev.id;
            top_probs[(size_t)row * top_k + r] = prev.v;
        }
    }

    if (row < drafted && threadIdx.x == 0) {
        const unsigned int x = tokens[row];
        target_prob[row] = x < vocab ? p[x] : 0.0f;
        token_logit[row] = x < vocab ? l[x] : -INFINITY;
        if (q != nullptr) draft_prob[row] = x < vocab ? q[(size_t)row * vocab + x] : 0.0f;
    }

    // The judge logit of drafted position `row`.
    if (hidden != nullptr && row < drafted) {
        const float* h = hidden + (size_t)(row + judge_row0) * hidden_size;
        double dot = 0.0;
        for (unsigned int j = threadIdx.x; j < hidden_size; j += BLOCK)
            dot += (double)h[j] * (double)judge_w[j];
        dot = block_sum(dot, sum_scratch);
        if (threadIdx.x == 0) judge[row] = (float)(dot + (double)judge_b);
    }
}

// Draws one token per request (grid: one block per request, BLOCK threads), as sample::sample
// does on the CPU: the first token whose running mass exceeds u * total.
//
// probs [.., vocab]: the rows step_features wrote; request i draws from row rows[i], from the
// residual norm(max(0, p - q)) (sample::residual) when it names a q row (q_rows[i] >= 0, in q
// [.., vocab]) or a one-hot q (onehot[i] >= 0, a deterministic drafter's token), else from p
// itself (a bonus token or a `sample` correction). A residual without mass falls back to p.
extern "C" __global__ void __launch_bounds__(BLOCK) step_sample(
    const float* __restrict__ probs, unsigned int vocab, const unsigned int* __restrict__ rows,
    const float* __restrict__ q, const int* __restrict__ q_rows, const int* __restrict__ onehot,
    const float* __restrict__ uniforms, unsigned int requests, unsigned int* __restrict__ out) {
    __shared__ double sum_scratch[WARPS];
    __shared__ double warp_total[WARPS];
    __shared__ Entry best_scratch[WARPS];
    __shared__ unsigned int found;
    const unsigned int req = blockIdx.x;
    if (req >= requests) return;
    const float* p = probs + (size_t)rows[req] * vocab;
    const float* qr = (q != nullptr && q_rows[req] >= 0) ? q + (size_t)q_rows[req] * vocab : nullptr;
    const int hot = onehot[req];
    bool residual = qr != nullptr || hot >= 0;

    // Contiguous chunks per thread, so a running sum can be resumed inside one chunk.
    const unsigned int chunk = (vocab + BLOCK - 1) / BLOCK;
    const unsigned int lo = min(vocab, threadIdx.x * chunk), hi = min(vocab, lo + chunk);
    float scale = 1.0f;
    if (residual) {
        double mass = 0.0;
        for (unsigned int j = lo; j < hi; ++j) {
            const float qj = qr != nullptr ? qr[j] : ((int)j == hot ? 1.0f : 0.0f);
            mass += (double)fmaxf(p[j] - qj, 0.0f);
        }
        mass = block_sum(mass, sum_scratch);
        if (mass > 0.0 && isfinite(mass)) {
            scale = (float)(1.0 / mass);
        } else {
            residual = false;  // no residual mass (p <= q everywhere): draw from p
        }
    }
    // r_j: the (unnormalised for p) weights sample::sample walks through.
#define WEIGHT(j)                                                                              \
    (residual ? fmaxf(p[j] - (qr != nullptr ? qr[j] : ((int)(j) == hot ? 1.0f : 0.0f)), 0.0f) * \
                    scale                                                                      \
              : p[j])

    double own = 0.0;
    unsigned int last = 0;
    bool any = false;
    for (unsigned int j = lo; j < hi; ++j) {
        const float w = WEIGHT(j);
        if (w > 0.0f) {
            own += (double)w;
            last = j;
            any = true;
        }
    }
    // Exclusive prefix of the chunk masses over the threads: a warp scan, then a scan of the warp
    // totals (a fixed order).
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    double incl = own;
    for (int off = 1; off < 32; off <<= 1) {
        const double y = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += y;
    }
    double excl = __shfl_up_sync(0xffffffffu, incl, 1);
    if (lane == 0) excl = 0.0;
    if (lane == 31) warp_total[warp] = incl;
    if (threadIdx.x == 0) found = 0xffffffffu;
    __syncthreads();
    if (warp == 0) {
        double t = warp_total[lane];
        for (int off = 1; off < 32; off <<= 1) {
            const double y = __shfl_up_sync(0xffffffffu, t, off);
            if (lane >= off) t += y;
        }
        warp_total[lane] = t;  // inclusive
    }
    __syncthreads();
    if (warp > 0) excl += warp_total[warp - 1];
    const double total = warp_total[WARPS - 1];
    // The last token with mass, for a target rounding left at the very top; (id 0 when none).
    Entry lastnz = {any ? 1.0f : 0.0f, any ? 0xffffffffu - last : 0xffffffffu};
    lastnz = block_best(lastnz, best_scratch);
    if (total <= 0.0 || !isfinite(total)) {
        // No mass at all: sample::sample gives the argmax of the weights, here all <= 0 -> 0.
        if (threadIdx.x == 0) out[req] = 0;
        return;
    }
    const double target = (double)fminf(fmaxf(uniforms[req], 0.0f), 1.0f) * total;
    double acc = excl;
    if (acc <= target && target < acc + own) {
        for (unsigned int j = lo; j < hi; ++j) {
            const float w = WEIGHT(j);
            if (w > 0.0f) {
                acc += (double)w;
                if (acc > target) {
                    atomicMin(&found, j);
                    break;
                }
            }
        }
    }
#undef WEIGHT
    __syncthreads();
    if (threadIdx.x == 0) out[req] = found != 0xffffffffu ? found : 0xffffffffu - lastnz.id;
}
