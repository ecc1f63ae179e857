/* The fused kernels for one 16-bit float type, included by _fused.c once per type with
   KERNEL(name) (the function's name for the type), TO_FLOAT and FROM_FLOAT (exact
   widening; rounding to nearest even), INF_BITS (the magnitude bits of infinity) and
   ONE_BITS (1.0) defined. */

CLONES
static void KERNEL(delta_histogram)(const uint16_t *restrict base, const uint16_t *restrict model, Py_ssize_t n,
                                   uint32_t *restrict hist) {
    uint16_t keys[BLOCK];
    for (Py_ssize_t start = 0; start < n; start += BLOCK) {
        int m = (n - start) < BLOCK ? (int)(n - start) : BLOCK;
        const uint16_t *restrict b = base + start;
        const uint16_t *restrict x = model + start;
        for (int j = 0; j < m; j++)
            keys[j] = FROM_FLOAT(TO_FLOAT(x[j]) - TO_FLOAT(b[j])) & 0x7FFF;
        for (int j = 0; j < m; j++)
            hist[keys[j]]++;
    }
}

CLONES
static int64_t KERNEL(delta_key_count)(const uint16_t *restrict base, const uint16_t *restrict model, Py_ssize_t n,
                                      uint16_t key) {
    int64_t count = 0;
    for (Py_ssize_t j = 0; j < n; j++)
        count += (FROM_FLOAT(TO_FLOAT(model[j]) - TO_FLOAT(base[j])) & 0x7FFF) == key;
    return count;
}

CLONES
static void KERNEL(merge)(const MergeArgs *args, const uint16_t *restrict base, Py_ssize_t n, uint16_t *restrict out) {
    float b[BLOCK], vote[BLOCK], mixed[BLOCK], divisor[BLOCK];
    uint16_t elected_negative[BLOCK];
    uint16_t weighted[MAX_MODELS][BLOCK];
    const int nm = args->n_models;
    int64_t quotas[MAX_MODELS];
    memcpy(quotas, args->tie_quotas, sizeof quotas);
    for (Py_ssize_t start = 0; start < n; start += BLOCK) {
        int m = (n - start) < BLOCK ? (int)(n - start) : BLOCK;
        for (int j = 0; j < m; j++) {
            b[j] = TO_FLOAT(base[start + j]);
            vote[j] = 0.0f;
            mixed[j] = 0.0f;
            divisor[j] = 0.0f;
        }
        for (int i = 0; i < nm; i++) {
            const uint16_t *restrict x = args->models[i] + start;
            uint16_t *restrict w_out = weighted[i];
            const float w = TO_FLOAT(args->weights[i]);
            if (args->masks[i] != NULL) {
                const uint16_t *restrict keep = args->masks[i] + start;
                for (int j = 0; j < m; j++) {
                    uint16_t d = FROM_FLOAT(TO_FLOAT(x[j]) - b[j]) & keep[j];
                    uint16_t v = FROM_FLOAT(TO_FLOAT(d) * w);
                    w_out[j] = v;
                    vote[j] += TO_FLOAT(v);
                }
            } else {
                const int32_t threshold = args->thresholds[i];
                uint16_t d[BLOCK];
                for (int j = 0; j < m; j++) {
                    uint16_t delta = FROM_FLOAT(TO_FLOAT(x[j]) - b[j]);
                    int32_t key = delta & 0x7FFF;
                    d[j] = key > threshold ? delta : (uint16_t)(delta & 0x8000);
                }
                if (args->tie_quotas[i] >= 0) /* keys == threshold + 1 past the quota are dropped, in flat order */
                    for (int j = 0; j < m; j++)
                        if ((d[j] & 0x7FFF) == threshold + 1) {
                            if (quotas[i] > 0)
                                quotas[i]--;
                            else
                                d[j] &= 0x8000;
                        }
                for (int j = 0; j < m; j++) {
                    uint16_t v = FROM_FLOAT(TO_FLOAT(d[j]) * w);
                    w_out[j] = v;
                    vote[j] += TO_FLOAT(v);
                }
            }
        }
        if (args->consensus) {
            for (int j = 0; j < m; j++) {
                /* the elected sign is + where the rounded vote >= 0 (a NaN vote elects -) */
                uint32_t v = FROM_FLOAT(vote[j]);
                uint32_t magnitude = v & 0x7FFF;
                uint32_t negative = ((v >> 15) & (magnitude != 0)) | (magnitude > INF_BITS);
                elected_negative[j] = (uint16_t)(negative << 15);
            }
            for (int i = 0; i < nm; i++) {
                const uint16_t *restrict v = weighted[i];
                const uint16_t w = args->weights[i];
                for (int j = 0; j < m; j++) {
                    uint16_t agree = (uint16_t)-(uint16_t)(((v[j] & 0x7FFF) != 0) & ((v[j] & 0x8000) == elected_negative[j]));
                    uint16_t keep = agree | 0x8000; /* a dropped value keeps its sign: x * 0 */
                    mixed[j] += TO_FLOAT(v[j] & keep);
                    divisor[j] += TO_FLOAT(w & keep);
                }
            }
            for (int j = 0; j < m; j++) {
                uint16_t d = FROM_FLOAT(divisor[j]);
                uint16_t zero = (uint16_t)-(uint16_t)((d & 0x7FFF) == 0);
                d ^= (d ^ ONE_BITS) & zero; /* a zero divisor becomes 1 */
                divisor[j] = TO_FLOAT(d);
            }
        } else {
            for (int j = 0; j < m; j++) {
                mixed[j] = vote[j];
                divisor[j] = args->divisor;
            }
        }
        for (int j = 0; j < m; j++)
            mixed[j] = TO_FLOAT(FROM_FLOAT(mixed[j]));
        if (args->normalize)
            for (int j = 0; j < m; j++)
                mixed[j] = TO_FLOAT(FROM_FLOAT(mixed[j] / divisor[j]));
        if (args->scaled) {
            const float scale = args->scale;
            for (int j = 0; j < m; j++)
                mixed[j] = TO_FLOAT(FROM_FLOAT(mixed[j] * scale));
        }
        for (int j = 0; j < m; j++)
            out[start + j] = FROM_FLOAT(b[j] + mixed[j]);
    }
}
