/* sinkscope's fused row pass for statistics mode on the CPU.
 *
 * One call takes a block of attention scores [heads, C, LD] (query rows q0 .. q0+C-1, keys 0 .. LD-1; the
 * caller has done the score product) and, row by row while the row is in cache, forms the probabilities
 * and every statistic sinkscope keeps: softmax, entropy, the first K probabilities, the band A[q, q-d],
 * the received mass (column sums over rows q >= K) and the pooled map (sums over key bins). The torch path
 * needs about ten passes over each block for the same numbers; this is one read of the scores and two
 * passes over each probability row.
 *
 * Learned sinks (gpt-oss): `sink` [heads] holds a per-head logit that joins every row's softmax as one more
 * outcome that is no key; the row's probabilities then sum to 1 - (sink probability), which goes to
 * `sink_prob` [heads, T], and the entropy is that of the whole distribution, sink included. Both are NULL
 * for models without learned sinks: one test per row, nothing in the loops over keys.
 *
 * Threads: OpenMP, sharing torch's runtime (torch loads libgomp.so.1 first, so this library's reference
 * binds to it). Each thread adds into its own slice of `received` and `pooled`; the caller sums slices.
 * Built with -ffast-math: masked scores are finite (-FLT_MAX), never inf or NaN.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

int sinkscope_rows_version(void) { return 2; }

void sinkscope_rows(const float *scores, float *probs, int64_t heads, int64_t rows, int64_t ld, int64_t q0,
                    int causal, int64_t t, int64_t k_max, int64_t local, float *first, float *band,
                    float *entropy, const float *sink, float *sink_prob, double *received, double *pooled,
                    const int64_t *edges, int64_t n_bins, const int64_t *query_bin, int threads) {
    const int64_t units = heads * rows;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t u = 0; u < units; u++) {
        const int me = omp_get_thread_num();
        const int64_t h = u / rows, r = u % rows, q = q0 + r;
        const float *s = scores + u * ld;
        float *p = probs + u * ld;
        const int64_t n = causal ? q + 1 : ld; /* keys this row can see; the rest are zero */

        float m = s[0];
        for (int64_t j = 1; j < n; j++) m = s[j] > m ? s[j] : m;
        const float sk = sink ? sink[h] : 0.0f;
        if (sink && sk > m) m = sk;
        float z = 0.0f, dot = 0.0f;
        for (int64_t j = 0; j < n; j++) {
            const float d = s[j] - m;
            const float e = expf(d);
            p[j] = e;
            z += e;
            dot += e * d;
        }
        float es = 0.0f; /* exp(sink - m): the sink's unnormalised share of the row */
        if (sink) {
            const float d = sk - m;
            es = expf(d);
            z += es;
            dot += es * d;
        }
        const float inv = 1.0f / z;
        /* H = -sum p log p = log Z - sum e (s - m) / Z, with p = e / Z and e = exp(s - m) (the sink is one
         * more term of both sums). */
        entropy[h * t + q] = logf(z) - dot * inv;
        if (sink) sink_prob[h * t + q] = es * inv;
        if (n < ld) memset(p + n, 0, (size_t)(ld - n) * sizeof(float));

        double *recv = q >= k_max ? received + (int64_t)me * t : NULL;
        double *pool = n_bins ? pooled + (((int64_t)me * heads + h) * n_bins + query_bin[q]) * n_bins : NULL;
        if (pool) {
            for (int64_t b = 0; b < n_bins && edges[b] < n; b++) {
                const int64_t hi = edges[b + 1] < n ? edges[b + 1] : n;
                float acc = 0.0f;
                for (int64_t j = edges[b]; j < hi; j++) {
                    const float v = p[j] * inv;
                    p[j] = v;
                    acc += v;
                }
                pool[b] += acc;
            }
        } else {
            for (int64_t j = 0; j < n; j++) p[j] *= inv;
        }
        if (recv)
            for (int64_t j = 0; j < n; j++) recv[j] += p[j];

        float *f = first + (h * t + q) * k_max;
        for (int64_t k = 0; k < k_max; k++) f[k] = k < ld ? p[k] : 0.0f;
        float *bd = band + (h * t + q) * local;
        for (int64_t d = 0; d < local; d++) bd[d] = q - d >= 0 ? p[q - d] : 0.0f;
    }
}
