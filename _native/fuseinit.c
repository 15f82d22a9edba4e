/* Asks the kernel to cache symlink targets (FUSE_CAP_CACHE_SYMLINKS) on zest's FUSE mount.
 *
 * pyfuse3 builds the libfuse session itself and its init handler never asks for this
 * capability, so every readlink of a lazy layer's symlink is a request to the FUSE process
 * (measured: 5,700 of them, about 0.6 s, in one `initdb`, which walks tzdata's symlinks).
 * Layers never change, so the kernel may keep every target for good.
 *
 * How: this module defines fuse_session_new. Imported with RTLD_GLOBAL before pyfuse3
 * (snapshotter/fuse/kernelcaps.py), it comes first in the dynamic linker's search order, so
 * pyfuse3's call lands here; the ops table is copied with its init handler wrapped, and the
 * real fuse_session_new (looked up by version in libfuse3) gets the copy.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>  /* dlvsym: Python.h has defined _GNU_SOURCE */
#include <string.h>

#define FUSE_USE_VERSION 31
#include <fuse_lowlevel.h>

typedef struct fuse_session *(*session_new_fn)(struct fuse_args *, const struct fuse_lowlevel_ops *,
                                               size_t, void *);

static struct fuse_lowlevel_ops wrapped_ops;
static void (*inner_init)(void *, struct fuse_conn_info *);
static int calls;    /* fuse_session_new calls that came through here */
static int granted;  /* the kernel offered the capability and it was asked for */

static void zest_init(void *userdata, struct fuse_conn_info *conn)
{
    if (conn->capable & FUSE_CAP_CACHE_SYMLINKS) {
        conn->want |= FUSE_CAP_CACHE_SYMLINKS;
        granted = 1;
    }
    if (inner_init)
        inner_init(userdata, conn);
}

struct fuse_session *fuse_session_new(struct fuse_args *args, const struct fuse_lowlevel_ops *op,
                                      size_t op_size, void *userdata)
{
    void *lib = dlopen("libfuse3.so.3", RTLD_NOW);
    session_new_fn real = NULL;
    if (lib)
        real = (session_new_fn)dlvsym(lib, "fuse_session_new", "FUSE_3.0");
    if (!real)
        return NULL;
    if (op_size > sizeof(wrapped_ops))
        return real(args, op, op_size, userdata);  /* a newer table than ours: leave it be */
    memset(&wrapped_ops, 0, sizeof(wrapped_ops));
    memcpy(&wrapped_ops, op, op_size);
    inner_init = op->init;
    wrapped_ops.init = zest_init;
    calls++;
    return real(args, &wrapped_ops, op_size, userdata);
}

static PyObject *status(PyObject *self, PyObject *unused)
{
    return Py_BuildValue("{s:i,s:i}", "sessions", calls, "cache_symlinks", granted);
}

static PyMethodDef methods[] = {
    {"status", status, METH_NOARGS,
     "{'sessions': sessions made through this module, 'cache_symlinks': 1 once granted}"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native.fuseinit", NULL, -1, methods};

PyMODINIT_FUNC PyInit_fuseinit(void)
{
    return PyModule_Create(&module);
}
