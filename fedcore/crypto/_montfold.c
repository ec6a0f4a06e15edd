/*
 * fedcore.crypto._montfold: the aggregator's fold and validation loops in C, on raw
 * fixed-width big-endian ciphertext bytes, with OpenSSL's Montgomery multiplication.
 *
 * Nothing here is a new primitive: every multiplication, reduction and gcd is an
 * OpenSSL BIGNUM call (BN_mod_mul_montgomery, BN_from_montgomery, BN_gcd,
 * BN_mod_exp). This module only runs the loops that Python would otherwise run one
 * ciphertext at a time, without creating a Python object per ciphertext and without
 * holding the GIL, so fold threads of one process use every core.
 *
 * A SliceFolder keeps the running product of `count` ciphertext positions mod n².
 * fold() multiplies one update's ciphertexts in with Montgomery multiplication:
 * MontMul(a, c) = a·c·R^-1 mod n², R = 2^(64·words(n²)). Starting from 1, after j folds
 * a position holds (product of its ciphertexts)·R^-j; result() multiplies by R^(j+1)
 * under one more MontMul, which leaves the plain product. Each result equals
 * gmpy2's running `a * c % n²` (tested in tests/crypto/test_montfold.py).
 *
 * validate() checks 0 < c < n² for every ciphertext and gcd(c, n) = 1 for all of them
 * at once: gcd(prod (c_i R^-1 mod n) mod n, n) = 1 iff every gcd(c_i, n) = 1, because
 * R is a unit mod n (n odd) and coprimality is multiplicative. Only when that single
 * gcd fails is each ciphertext tested alone to name the first bad one.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <string.h>

#include <openssl/bn.h>
#include <openssl/crypto.h>

typedef struct {
    PyObject_HEAD
    BN_CTX *ctx;
    BN_MONT_CTX *mont_n2;
    BN_MONT_CTX *mont_n;
    BIGNUM *n;
    BIGNUM *n2;
    BIGNUM **acc;      /* count running products, each (product)·R^-folds mod n² */
    BIGNUM *c;         /* scratch: the ciphertext being worked on */
    BIGNUM *t;         /* scratch */
    BIGNUM *p;         /* scratch: the validation product mod n */
    unsigned char *n2_bytes; /* n² big-endian in `width` bytes, for the range check */
    Py_ssize_t count;
    Py_ssize_t width;
    unsigned long long folds;
    int busy;          /* a call is running with the GIL released */
    int broken;        /* an OpenSSL call failed mid-fold: the sum can no longer be trusted */
} SliceFolder;

static void
folder_free_bignums(SliceFolder *self)
{
    if (self->acc != NULL) {
        for (Py_ssize_t i = 0; i < self->count; i++) {
            BN_free(self->acc[i]);
        }
        PyMem_RawFree(self->acc);
        self->acc = NULL;
    }
    BN_free(self->c);
    BN_free(self->t);
    BN_free(self->p);
    BN_free(self->n);
    BN_free(self->n2);
    BN_MONT_CTX_free(self->mont_n);
    BN_MONT_CTX_free(self->mont_n2);
    BN_CTX_free(self->ctx);
    PyMem_RawFree(self->n2_bytes);
    self->c = self->t = self->p = self->n = self->n2 = NULL;
    self->mont_n = self->mont_n2 = NULL;
    self->ctx = NULL;
    self->n2_bytes = NULL;
}

static void
folder_dealloc(SliceFolder *self)
{
    folder_free_bignums(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
folder_init(SliceFolder *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"n", "count", NULL};
    Py_buffer n_buf;
    Py_ssize_t count;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*n", kwlist, &n_buf, &count)) {
        return -1;
    }
    if (self->ctx != NULL) {
        PyBuffer_Release(&n_buf);
        PyErr_SetString(PyExc_RuntimeError, "SliceFolder is already initialized");
        return -1;
    }
    if (count < 0) {
        PyBuffer_Release(&n_buf);
        PyErr_Format(PyExc_ValueError, "count must be >= 0; got %zd", count);
        return -1;
    }
    self->ctx = BN_CTX_new();
    self->n = BN_bin2bn((const unsigned char *)n_buf.buf, (int)n_buf.len, NULL);
    PyBuffer_Release(&n_buf);
    self->n2 = BN_new();
    self->c = BN_new();
    self->t = BN_new();
    self->p = BN_new();
    self->mont_n = BN_MONT_CTX_new();
    self->mont_n2 = BN_MONT_CTX_new();
    if (!self->ctx || !self->n || !self->n2 || !self->c || !self->t || !self->p ||
        !self->mont_n || !self->mont_n2) {
        PyErr_NoMemory();
        return -1;
    }
    if (BN_num_bits(self->n) < 2 || !BN_is_odd(self->n)) {
        PyErr_SetString(PyExc_ValueError, "n must be an odd integer > 1 (a Paillier modulus)");
        return -1;
    }
    if (!BN_sqr(self->n2, self->n, self->ctx) ||
        !BN_MONT_CTX_set(self->mont_n, self->n, self->ctx) ||
        !BN_MONT_CTX_set(self->mont_n2, self->n2, self->ctx)) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL could not set up Montgomery contexts");
        return -1;
    }
    /* fedcore's wire width: 2 * ceil(bits(n) / 8) bytes per ciphertext */
    self->width = 2 * (Py_ssize_t)BN_num_bytes(self->n);
    self->n2_bytes = PyMem_RawMalloc((size_t)self->width);
    if (self->n2_bytes == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    if (BN_bn2binpad(self->n2, self->n2_bytes, (int)self->width) < 0) {
        PyErr_SetString(PyExc_RuntimeError, "n^2 does not fit its own width");
        return -1;
    }
    self->acc = PyMem_RawCalloc(count > 0 ? (size_t)count : 1, sizeof(BIGNUM *));
    if (self->acc == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->count = count;
    for (Py_ssize_t i = 0; i < count; i++) {
        self->acc[i] = BN_new();
        if (self->acc[i] == NULL || !BN_one(self->acc[i])) {
            PyErr_NoMemory();
            return -1;
        }
    }
    self->folds = 0;
    return 0;
}

/* Claim the object for a GIL-free call; fills `view` with the data's bytes. */
static int
folder_enter(SliceFolder *self, PyObject *data, Py_buffer *view)
{
    if (self->ctx == NULL || self->acc == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "SliceFolder was not initialized");
        return -1;
    }
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "SliceFolder is in use by another thread");
        return -1;
    }
    if (data != NULL) {
        if (PyObject_GetBuffer(data, view, PyBUF_SIMPLE) < 0) {
            return -1;
        }
        if (view->len != self->count * self->width) {
            PyErr_Format(PyExc_ValueError,
                         "slice data is %zd bytes; %zd ciphertexts of %zd bytes are %zd",
                         view->len, self->count, self->width, self->count * self->width);
            PyBuffer_Release(view);
            return -1;
        }
    }
    self->busy = 1;
    return 0;
}

static void
folder_leave(SliceFolder *self, PyObject *data, Py_buffer *view)
{
    self->busy = 0;
    if (data != NULL) {
        PyBuffer_Release(view);
    }
}

/* First index with c = 0 or c >= bound among `count` big-endian integers of `width`
 * bytes, or -1. Equal-width big-endian integers compare like memcmp. */
static Py_ssize_t
scan_range(const unsigned char *data, Py_ssize_t count, const unsigned char *bound,
           Py_ssize_t width)
{
    for (Py_ssize_t i = 0; i < count; i++) {
        const unsigned char *ct = data + i * width;
        if (memcmp(ct, bound, (size_t)width) >= 0) {
            return i;
        }
        Py_ssize_t k = 0;
        while (k < width && ct[k] == 0) {
            k++;
        }
        if (k == width) {
            return i;
        }
    }
    return -1;
}

static Py_ssize_t
first_out_of_range(const SliceFolder *self, const unsigned char *data)
{
    return scan_range(data, self->count, self->n2_bytes, self->width);
}

/* Status codes of the GIL-free loops. */
enum { LOOP_OK = 0, LOOP_BAD_INDEX = 1, LOOP_OPENSSL = 2 };

static int
validate_loop(SliceFolder *self, const unsigned char *data, Py_ssize_t *bad)
{
    Py_ssize_t index = first_out_of_range(self, data);
    if (index >= 0) {
        *bad = index;
        return LOOP_BAD_INDEX;
    }
    if (!BN_one(self->p)) {
        return LOOP_OPENSSL;
    }
    for (Py_ssize_t i = 0; i < self->count; i++) {
        if (!BN_bin2bn(data + i * self->width, (int)self->width, self->c) ||
            !BN_from_montgomery(self->t, self->c, self->mont_n, self->ctx) ||
            !BN_mod_mul_montgomery(self->p, self->p, self->t, self->mont_n, self->ctx)) {
            return LOOP_OPENSSL;
        }
    }
    if (!BN_gcd(self->t, self->p, self->n, self->ctx)) {
        return LOOP_OPENSSL;
    }
    if (BN_is_one(self->t)) {
        return LOOP_OK;
    }
    for (Py_ssize_t i = 0; i < self->count; i++) {
        if (!BN_bin2bn(data + i * self->width, (int)self->width, self->c) ||
            !BN_gcd(self->t, self->c, self->n, self->ctx)) {
            return LOOP_OPENSSL;
        }
        if (!BN_is_one(self->t)) {
            *bad = i;
            return LOOP_BAD_INDEX;
        }
    }
    return LOOP_OPENSSL; /* the product had a factor of n, so some c_i must have one */
}

static PyObject *
folder_validate(SliceFolder *self, PyObject *data)
{
    Py_buffer view;
    Py_ssize_t bad = -1;
    int status;
    if (folder_enter(self, data, &view) < 0) {
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    status = validate_loop(self, (const unsigned char *)view.buf, &bad);
    Py_END_ALLOW_THREADS
    folder_leave(self, data, &view);
    if (status == LOOP_OPENSSL) {
        PyErr_SetString(PyExc_RuntimeError, "an OpenSSL BIGNUM call failed during validation");
        return NULL;
    }
    return PyLong_FromSsize_t(status == LOOP_BAD_INDEX ? bad : -1);
}

static int
fold_loop(SliceFolder *self, const unsigned char *data)
{
    for (Py_ssize_t i = 0; i < self->count; i++) {
        if (!BN_bin2bn(data + i * self->width, (int)self->width, self->c) ||
            !BN_mod_mul_montgomery(self->acc[i], self->acc[i], self->c, self->mont_n2,
                                   self->ctx)) {
            return LOOP_OPENSSL;
        }
    }
    return LOOP_OK;
}

static PyObject *
folder_fold(SliceFolder *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"data", "updates", NULL};
    PyObject *data;
    unsigned long long updates = 1;
    Py_buffer view;
    Py_ssize_t bad;
    int status;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|K", kwlist, &data, &updates)) {
        return NULL;
    }
    if (updates < 1) {
        PyErr_SetString(PyExc_ValueError, "updates must be >= 1");
        return NULL;
    }
    if (self->broken) {
        PyErr_SetString(PyExc_RuntimeError, "SliceFolder is broken by an earlier failure");
        return NULL;
    }
    if (folder_enter(self, data, &view) < 0) {
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    bad = first_out_of_range(self, (const unsigned char *)view.buf);
    status = bad >= 0 ? LOOP_BAD_INDEX : fold_loop(self, (const unsigned char *)view.buf);
    Py_END_ALLOW_THREADS
    folder_leave(self, data, &view);
    if (status == LOOP_BAD_INDEX) {
        /* nothing was multiplied in: the range is checked before the first product */
        PyErr_Format(PyExc_ValueError, "ciphertext at index %zd is outside 0 < c < n^2", bad);
        return NULL;
    }
    if (status == LOOP_OPENSSL) {
        self->broken = 1;
        PyErr_SetString(PyExc_RuntimeError, "an OpenSSL BIGNUM call failed during a fold");
        return NULL;
    }
    self->folds += updates;
    Py_RETURN_NONE;
}

/* out[i] = MontMul(...MontMul(c_0[i], c_1[i])..., c_{k-1}[i]) = prod_u c_u[i] R^-(k-1). */
static int
product_loop(SliceFolder *self, Py_buffer *views, Py_ssize_t k, unsigned char *out)
{
    for (Py_ssize_t i = 0; i < self->count; i++) {
        const Py_ssize_t at = i * self->width;
        if (!BN_bin2bn((const unsigned char *)views[0].buf + at, (int)self->width, self->t)) {
            return LOOP_OPENSSL;
        }
        for (Py_ssize_t u = 1; u < k; u++) {
            if (!BN_bin2bn((const unsigned char *)views[u].buf + at, (int)self->width, self->c) ||
                !BN_mod_mul_montgomery(self->t, self->t, self->c, self->mont_n2, self->ctx)) {
                return LOOP_OPENSSL;
            }
        }
        if (BN_bn2binpad(self->t, out + at, (int)self->width) < 0) {
            return LOOP_OPENSSL;
        }
    }
    return LOOP_OK;
}

static PyObject *
folder_product(SliceFolder *self, PyObject *datas)
{
    PyObject *seq = PySequence_Fast(datas, "product() takes a sequence of byte buffers");
    if (seq == NULL) {
        return NULL;
    }
    Py_ssize_t k = PySequence_Fast_GET_SIZE(seq);
    Py_buffer *views = NULL;
    Py_ssize_t held = 0;
    PyObject *out = NULL;
    int status;
    if (k < 1) {
        PyErr_SetString(PyExc_ValueError, "product() needs at least one update");
        goto done;
    }
    if (self->ctx == NULL || self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "SliceFolder is not initialized, or in use");
        goto done;
    }
    views = PyMem_Calloc((size_t)k, sizeof(Py_buffer));
    if (views == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (; held < k; held++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, held);
        if (PyObject_GetBuffer(item, &views[held], PyBUF_SIMPLE) < 0) {
            goto done;
        }
        if (views[held].len != self->count * self->width) {
            PyErr_Format(PyExc_ValueError, "update %zd is %zd bytes; %zd ciphertexts are %zd",
                         held, views[held].len, self->count, self->count * self->width);
            held++;
            goto done;
        }
        Py_ssize_t bad = first_out_of_range(self, (const unsigned char *)views[held].buf);
        if (bad >= 0) {
            PyErr_Format(PyExc_ValueError,
                         "update %zd: ciphertext at index %zd is outside 0 < c < n^2", held, bad);
            held++;
            goto done;
        }
    }
    out = PyBytes_FromStringAndSize(NULL, self->count * self->width);
    if (out == NULL) {
        goto done;
    }
    unsigned char *buf = (unsigned char *)PyBytes_AS_STRING(out);
    self->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    status = product_loop(self, views, k, buf);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (status != LOOP_OK) {
        Py_CLEAR(out);
        PyErr_SetString(PyExc_RuntimeError, "an OpenSSL BIGNUM call failed in a product");
    }
done:
    for (Py_ssize_t u = 0; u < held; u++) {
        PyBuffer_Release(&views[u]);
    }
    PyMem_Free(views);
    Py_DECREF(seq);
    return out;
}

static int
result_loop(SliceFolder *self, unsigned char *out)
{
    int ok;
    BIGNUM *exponent = BN_new();
    BIGNUM *factor = BN_new();
    /* factor = R^(folds + 1) mod n², from R mod n² = to_montgomery(1) */
    ok = exponent && factor && BN_one(self->t) &&
         BN_to_montgomery(self->t, self->t, self->mont_n2, self->ctx) &&
         BN_set_word(exponent, (BN_ULONG)self->folds) && BN_add_word(exponent, 1) &&
         BN_mod_exp(factor, self->t, exponent, self->n2, self->ctx);
    for (Py_ssize_t i = 0; ok && i < self->count; i++) {
        ok = BN_mod_mul_montgomery(self->t, self->acc[i], factor, self->mont_n2, self->ctx) &&
             BN_bn2binpad(self->t, out + i * self->width, (int)self->width) >= 0;
    }
    BN_free(exponent);
    BN_free(factor);
    return ok ? LOOP_OK : LOOP_OPENSSL;
}

static PyObject *
folder_result(SliceFolder *self, PyObject *Py_UNUSED(ignored))
{
    int status;
    if (self->broken) {
        PyErr_SetString(PyExc_RuntimeError, "SliceFolder is broken by an earlier failure");
        return NULL;
    }
    if (folder_enter(self, NULL, NULL) < 0) {
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, self->count * self->width);
    if (out == NULL) {
        folder_leave(self, NULL, NULL);
        return NULL;
    }
    unsigned char *buf = (unsigned char *)PyBytes_AS_STRING(out);
    Py_BEGIN_ALLOW_THREADS
    status = result_loop(self, buf);
    Py_END_ALLOW_THREADS
    folder_leave(self, NULL, NULL);
    if (status != LOOP_OK) {
        Py_DECREF(out);
        PyErr_SetString(PyExc_RuntimeError, "an OpenSSL BIGNUM call failed reading the sum");
        return NULL;
    }
    return out;
}

static PyObject *
folder_reset(SliceFolder *self, PyObject *Py_UNUSED(ignored))
{
    if (folder_enter(self, NULL, NULL) < 0) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < self->count; i++) {
        if (!BN_one(self->acc[i])) {
            folder_leave(self, NULL, NULL);
            return PyErr_NoMemory();
        }
    }
    self->folds = 0;
    self->broken = 0;
    folder_leave(self, NULL, NULL);
    Py_RETURN_NONE;
}

static PyMethodDef folder_methods[] = {
    {"validate", (PyCFunction)folder_validate, METH_O,
     "validate(data) -> int: -1 when every ciphertext is in Z*_{n²}, else the first bad index."},
    {"fold", (PyCFunction)(void (*)(void))folder_fold, METH_VARARGS | METH_KEYWORDS,
     "fold(data, updates=1): multiply ciphertexts into the running products, mod n². "
     "`updates` > 1 folds a product() of that many updates."},
    {"product", (PyCFunction)folder_product, METH_O,
     "product(datas) -> bytes: the slot-wise product of k updates (Montgomery form, "
     "R^-(k-1)); validate() it, then fold(it, updates=k) adds all k at once."},
    {"result", (PyCFunction)folder_result, METH_NOARGS,
     "result() -> bytes: the running products, fixed-width big-endian."},
    {"reset", (PyCFunction)folder_reset, METH_NOARGS,
     "reset(): every running product back to 1 (= E(0) with r = 1)."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef folder_members[] = {
    {"count", T_PYSSIZET, offsetof(SliceFolder, count), READONLY, "ciphertext positions"},
    {"width", T_PYSSIZET, offsetof(SliceFolder, width), READONLY, "bytes per ciphertext"},
    {"folds", T_ULONGLONG, offsetof(SliceFolder, folds), READONLY, "updates folded since reset"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject SliceFolderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fedcore.crypto._montfold.SliceFolder",
    .tp_doc = PyDoc_STR("SliceFolder(n: bytes, count: int): running products of count "
                        "ciphertext positions mod n², folded with OpenSSL Montgomery "
                        "multiplication, without the GIL."),
    .tp_basicsize = sizeof(SliceFolder),
    .tp_itemsize = 0,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)folder_init,
    .tp_dealloc = (destructor)folder_dealloc,
    .tp_methods = folder_methods,
    .tp_members = folder_members,
};

static PyObject *
montfold_first_out_of_range(PyObject *Py_UNUSED(module), PyObject *args)
{
    Py_buffer data, bound;
    Py_ssize_t index = -1;
    if (!PyArg_ParseTuple(args, "y*y*", &data, &bound)) {
        return NULL;
    }
    if (bound.len == 0 || data.len % bound.len != 0) {
        PyErr_Format(PyExc_ValueError, "data is %zd bytes, not a multiple of the %zd-byte bound",
                     data.len, bound.len);
        index = -2;
    } else {
        index = scan_range((const unsigned char *)data.buf, data.len / bound.len,
                           (const unsigned char *)bound.buf, bound.len);
    }
    PyBuffer_Release(&data);
    PyBuffer_Release(&bound);
    return index == -2 ? NULL : PyLong_FromSsize_t(index);
}

static PyMethodDef montfold_functions[] = {
    {"first_out_of_range", montfold_first_out_of_range, METH_VARARGS,
     "first_out_of_range(data, bound) -> int: the first fixed-width big-endian integer in "
     "data (of len(bound) bytes each) that is 0 or >= bound, or -1."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef montfold_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "fedcore.crypto._montfold",
    .m_doc = "The aggregator's fold and validation loops in C, on OpenSSL BIGNUMs.",
    .m_size = -1,
    .m_methods = montfold_functions,
};

PyMODINIT_FUNC
PyInit__montfold(void)
{
    if (PyType_Ready(&SliceFolderType) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&montfold_module);
    if (module == NULL) {
        return NULL;
    }
    Py_INCREF(&SliceFolderType);
    if (PyModule_AddObject(module, "SliceFolder", (PyObject *)&SliceFolderType) < 0 ||
        PyModule_AddStringConstant(module, "OPENSSL_VERSION",
                                   OpenSSL_version(OPENSSL_VERSION)) < 0) {
        Py_DECREF(&SliceFolderType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
