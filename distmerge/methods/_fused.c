/* Fused 16-bit float kernels (bfloat16, float16) for the task-vector methods (see
fused.py for the contract; the kernels themselves are in _fused_kernels.h).

Each kernel does in one pass over memory what the torch path does in a dozen, and rounds
exactly where the torch path rounds: every 16-bit op is computed in float32 and
rounded to nearest even, and model sums accumulate in float32 from +0, in model order,
and are rounded once. The results are the torch path's bit for bit.

The element loops work on blocks of BLOCK elements held in small arrays, written so
that the compiler vectorizes them; on x86-64 each kernel is compiled for AVX-512, AVX2
and the baseline, and the loader picks the best the CPU has.
*/

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 512
#define MAX_MODELS 16
#define BINS 65536

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Round to nearest even, NaN to the quiet NaN 0x7FC0 (as torch's scalar conversion). */
static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (f != f) ? (uint16_t)0x7FC0 : (uint16_t)rounded;
}

#if defined(__FLT16_MAX__)
#define HAVE_FLOAT16 1
/* float16 through the compiler's _Float16: F16C instructions where the clone has them,
   else libgcc's exact conversions; rounding to nearest even, as torch's. */
static inline float f16_to_float(uint16_t h) {
    _Float16 v;
    memcpy(&v, &h, sizeof v);
    return (float)v;
}

static inline uint16_t float_to_f16(float f) {
    _Float16 v = (_Float16)f;
    uint16_t h;
    memcpy(&h, &v, sizeof h);
    return h;
}
#else
#define HAVE_FLOAT16 0
#endif

/* The index of the first 16-bit float whose exponent bits are all set (Inf or NaN), or n. */
CLONES
static Py_ssize_t first_nonfinite_kernel(const uint16_t *restrict x, Py_ssize_t n, uint16_t exponent) {
    for (Py_ssize_t start = 0; start < n; start += BLOCK) {
        int m = (n - start) < BLOCK ? (int)(n - start) : BLOCK;
        int any = 0;
        for (int j = 0; j < m; j++)
            any |= (x[start + j] & exponent) == exponent;
        if (any)
            for (int j = 0; j < m; j++)
                if ((x[start + j] & exponent) == exponent)
                    return start + j;
    }
    return n;
}

typedef struct {
    int n_models;
    const uint16_t *models[MAX_MODELS];
    const uint16_t *masks[MAX_MODELS]; /* keep bits, or NULL: keep where key > threshold */
    int32_t thresholds[MAX_MODELS];
    int64_t tie_quotas[MAX_MODELS]; /* >= 0: keep only the first this many keys == threshold + 1 */
    uint16_t weights[MAX_MODELS];
    int consensus;
    int normalize;
    float divisor; /* without consensus */
    int scaled;
    float scale;
} MergeArgs;

#define KERNEL(name) name##_bf16
#define TO_FLOAT bf16_to_float
#define FROM_FLOAT float_to_bf16
#define INF_BITS 0x7F80
#define ONE_BITS 0x3F80
#include "_fused_kernels.h"
#undef KERNEL
#undef TO_FLOAT
#undef FROM_FLOAT
#undef INF_BITS
#undef ONE_BITS

#if HAVE_FLOAT16
#define KERNEL(name) name##_f16
#define TO_FLOAT f16_to_float
#define FROM_FLOAT float_to_f16
#define INF_BITS 0x7C00
#define ONE_BITS 0x3C00
#include "_fused_kernels.h"
#undef KERNEL
#undef TO_FLOAT
#undef FROM_FLOAT
#undef INF_BITS
#undef ONE_BITS
#endif

/* -- Python bindings ------------------------------------------------------------------- */

enum { HALF_BF16 = 0, HALF_F16 = 1 };

static int check_half(int half) {
    if (half == HALF_BF16 || (HAVE_FLOAT16 && half == HALF_F16))
        return 1;
    PyErr_Format(PyExc_ValueError, "16-bit float type %d is not built in (0: bfloat16%s)", half,
                 HAVE_FLOAT16 ? ", 1: float16" : "");
    return 0;
}

typedef struct {
    Py_buffer views[2 * MAX_MODELS + 3];
    int count;
} Buffers;

static void release_all(Buffers *held) {
    for (int i = 0; i < held->count; i++)
        PyBuffer_Release(&held->views[i]);
    held->count = 0;
}

/* A contiguous buffer of exactly `n` 16-bit values (n < 0: any length; its length is set). */
static const void *hold(Buffers *held, PyObject *obj, int writable, Py_ssize_t *n, const char *what) {
    Py_buffer *view = &held->views[held->count];
    if (PyObject_GetBuffer(obj, view, (writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) | PyBUF_C_CONTIGUOUS) != 0)
        return NULL;
    held->count++;
    if (view->len % 2 != 0 || (*n >= 0 && view->len != *n * 2)) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes, expected %zd 16-bit values", what, view->len, *n);
        return NULL;
    }
    *n = view->len / 2;
    return view->buf;
}

static PyObject *py_delta_histogram(PyObject *self, PyObject *args) {
    PyObject *base_obj, *model_obj, *hist_obj;
    int half;
    if (!PyArg_ParseTuple(args, "iOOO", &half, &base_obj, &model_obj, &hist_obj) || !check_half(half))
        return NULL;
    Buffers held = {.count = 0};
    Py_ssize_t n = -1, bins = 2 * BINS; /* uint32 bins, counted as 16-bit values */
    const uint16_t *base = hold(&held, base_obj, 0, &n, "base");
    const uint16_t *model = base ? hold(&held, model_obj, 0, &n, "model") : NULL;
    uint32_t *hist = model ? (uint32_t *)hold(&held, hist_obj, 1, &bins, "histogram (65536 uint32)") : NULL;
    if (hist == NULL) {
        release_all(&held);
        return NULL;
    }
    if (n > (Py_ssize_t)UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "over 2^32 elements: histogram in smaller pieces");
        release_all(&held);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    if (half == HALF_BF16)
        delta_histogram_bf16(base, model, n, hist);
#if HAVE_FLOAT16
    else
        delta_histogram_f16(base, model, n, hist);
#endif
    Py_END_ALLOW_THREADS
    release_all(&held);
    Py_RETURN_NONE;
}

static PyObject *py_delta_key_count(PyObject *self, PyObject *args) {
    PyObject *base_obj, *model_obj;
    int half, key;
    if (!PyArg_ParseTuple(args, "iOOi", &half, &base_obj, &model_obj, &key) || !check_half(half))
        return NULL;
    Buffers held = {.count = 0};
    Py_ssize_t n = -1;
    const uint16_t *base = hold(&held, base_obj, 0, &n, "base");
    const uint16_t *model = base ? hold(&held, model_obj, 0, &n, "model") : NULL;
    if (model == NULL) {
        release_all(&held);
        return NULL;
    }
    int64_t count;
    Py_BEGIN_ALLOW_THREADS
    if (half == HALF_BF16)
        count = delta_key_count_bf16(base, model, n, (uint16_t)key);
#if HAVE_FLOAT16
    else
        count = delta_key_count_f16(base, model, n, (uint16_t)key);
#endif
    Py_END_ALLOW_THREADS
    release_all(&held);
    return PyLong_FromLongLong(count);
}

static PyObject *py_first_nonfinite(PyObject *self, PyObject *args) {
    PyObject *obj;
    int exponent;
    if (!PyArg_ParseTuple(args, "Oi", &obj, &exponent))
        return NULL;
    Buffers held = {.count = 0};
    Py_ssize_t n = -1;
    const uint16_t *x = hold(&held, obj, 0, &n, "values");
    if (x == NULL) {
        release_all(&held);
        return NULL;
    }
    Py_ssize_t found;
    Py_BEGIN_ALLOW_THREADS
    found = first_nonfinite_kernel(x, n, (uint16_t)exponent);
    Py_END_ALLOW_THREADS
    release_all(&held);
    return PyLong_FromSsize_t(found);
}

static PyObject *py_merge(PyObject *self, PyObject *args) {
    PyObject *base_obj, *models_obj, *thresholds_obj, *quotas_obj, *masks_obj, *weights_obj, *out_obj, *scale_obj;
    int half, consensus, normalize;
    double divisor;
    if (!PyArg_ParseTuple(args, "iOOOOOOOppdO", &half, &base_obj, &models_obj, &thresholds_obj, &quotas_obj,
                          &masks_obj, &weights_obj, &out_obj, &consensus, &normalize, &divisor, &scale_obj) ||
        !check_half(half))
        return NULL;
    MergeArgs merge = {.consensus = consensus, .normalize = normalize, .divisor = (float)divisor};
    if (scale_obj != Py_None) {
        merge.scaled = 1;
        merge.scale = (float)PyFloat_AsDouble(scale_obj);
        if (PyErr_Occurred())
            return NULL;
    }
    Buffers held = {.count = 0};
    PyObject *models = NULL, *thresholds = NULL, *quotas = NULL, *masks = NULL;
    Py_ssize_t n = -1, nm = 0;
    const uint16_t *base = hold(&held, base_obj, 0, &n, "base");
    if (base == NULL)
        goto fail;
    models = PySequence_Fast(models_obj, "models must be a sequence");
    thresholds = models ? PySequence_Fast(thresholds_obj, "thresholds must be a sequence") : NULL;
    quotas = thresholds ? PySequence_Fast(quotas_obj, "tie quotas must be a sequence") : NULL;
    masks = quotas ? PySequence_Fast(masks_obj, "masks must be a sequence") : NULL;
    if (masks == NULL)
        goto fail;
    nm = PySequence_Fast_GET_SIZE(models);
    if (nm < 1 || nm > MAX_MODELS || PySequence_Fast_GET_SIZE(thresholds) != nm || PySequence_Fast_GET_SIZE(quotas) != nm ||
        PySequence_Fast_GET_SIZE(masks) != nm) {
        PyErr_Format(PyExc_ValueError, "1 to %d models, each with a threshold, a tie quota and a mask (or None)",
                     MAX_MODELS);
        goto fail;
    }
    merge.n_models = (int)nm;
    for (Py_ssize_t i = 0; i < nm; i++) {
        if ((merge.models[i] = hold(&held, PySequence_Fast_GET_ITEM(models, i), 0, &n, "model")) == NULL)
            goto fail;
        PyObject *mask = PySequence_Fast_GET_ITEM(masks, i);
        if (mask != Py_None && (merge.masks[i] = hold(&held, mask, 0, &n, "keep mask")) == NULL)
            goto fail;
        long threshold = PyLong_AsLong(PySequence_Fast_GET_ITEM(thresholds, i));
        if (PyErr_Occurred())
            goto fail;
        merge.thresholds[i] = (int32_t)(threshold < -1 ? -1 : threshold > 0x7FFF ? 0x7FFF : threshold);
        merge.tie_quotas[i] = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(quotas, i));
        if (PyErr_Occurred())
            goto fail;
    }
    Py_ssize_t n_weights = nm;
    const uint16_t *weights = hold(&held, weights_obj, 0, &n_weights, "weights");
    uint16_t *out = weights ? (uint16_t *)hold(&held, out_obj, 1, &n, "out") : NULL;
    if (out == NULL)
        goto fail;
    memcpy(merge.weights, weights, (size_t)nm * sizeof(uint16_t));
    Py_BEGIN_ALLOW_THREADS
    if (half == HALF_BF16)
        merge_bf16(&merge, base, n, out);
#if HAVE_FLOAT16
    else
        merge_f16(&merge, base, n, out);
#endif
    Py_END_ALLOW_THREADS
    Py_DECREF(models);
    Py_DECREF(thresholds);
    Py_DECREF(quotas);
    Py_DECREF(masks);
    release_all(&held);
    Py_RETURN_NONE;
fail:
    Py_XDECREF(models);
    Py_XDECREF(thresholds);
    Py_XDECREF(quotas);
    Py_XDECREF(masks);
    release_all(&held);
    return NULL;
}

static PyMethodDef methods[] = {
    {"delta_histogram", py_delta_histogram, METH_VARARGS,
     "delta_histogram(half, base, model, hist): add the magnitude-key histogram of (model - base) to hist."},
    {"delta_key_count", py_delta_key_count, METH_VARARGS,
     "delta_key_count(half, base, model, key): how many magnitude keys of (model - base) equal key."},
    {"first_nonfinite", py_first_nonfinite, METH_VARARGS,
     "first_nonfinite(values, exponent_mask): index of the first 16-bit Inf/NaN, or len(values)."},
    {"merge", py_merge, METH_VARARGS,
     "merge(half, base, models, thresholds, tie_quotas, masks, weights, out, consensus, normalize, divisor, "
     "scale): "
     "see fused.py."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fused", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fused(void) {
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && (PyModule_AddIntConstant(m, "MAX_MODELS", MAX_MODELS) != 0 ||
                      PyModule_AddIntConstant(m, "HAVE_FLOAT16", HAVE_FLOAT16) != 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
