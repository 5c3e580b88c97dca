/* Access log lines in C: the common case of lb/data/accesslog.py's formatters.
 *
 * json_line(fallback, limit, rec) and combined_line(fallback, limit, rec) return exactly the
 * bytes that accesslog.json_formatter(limit) / combined_formatter(limit) return for rec, for
 * a record whose strings need no escaping and no cutting and whose numbers are plain ints
 * and floats (nearly every request). Any other record goes to fallback(rec): the Python
 * formatter, the one definition of the format. Floats go through PyOS_double_to_string, as
 * Python's %.3f does; tests/test_accesslog.py compares both paths on every kind of record.
 *
 * Optional: built by setup.py when a C compiler is there; lb/data/accesslog.py works without
 * it (PAIRLB_PURE_PYTHON=1 forces the Python path).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <math.h>
#include <string.h>
#include <time.h>

#define NFIELDS 22
#define LINE_MAX_FAST 6144 /* longer lines (long names) take the Python path */

/* Printable ASCII but '"' and '\\' (accesslog._SAFE); TOK also excludes ' ' (_SAFE_TOK). */
static unsigned char safe_tab[256];
static unsigned char tok_tab[256];

typedef struct {
    const char *p;
    Py_ssize_t n;
} span;

/* bytes -> its buffer; None -> ""; ASCII str -> its UTF-8 (same bytes). 0: not fast. */
static int as_span(PyObject *v, span *out) {
    if (PyBytes_CheckExact(v)) {
        out->p = PyBytes_AS_STRING(v);
        out->n = PyBytes_GET_SIZE(v);
        return 1;
    }
    if (v == Py_None) {
        out->p = "";
        out->n = 0;
        return 1;
    }
    if (PyUnicode_CheckExact(v) && PyUnicode_IS_READY(v) && PyUnicode_IS_ASCII(v)) {
        out->p = (const char *)PyUnicode_DATA(v);
        out->n = PyUnicode_GET_LENGTH(v);
        return 1;
    }
    return 0;
}

static int all_in(const span *s, const unsigned char *tab) {
    const unsigned char *p = (const unsigned char *)s->p;
    for (Py_ssize_t i = 0; i < s->n; i++) {
        if (!tab[p[i]]) return 0;
    }
    return 1;
}

typedef struct {
    char *p;
    char *end;
} out_t;

static inline int put(out_t *o, const char *s, Py_ssize_t n) {
    if (o->end - o->p < n) return 0;
    memcpy(o->p, s, (size_t)n);
    o->p += n;
    return 1;
}

#define PUTLIT(o, lit) put((o), (lit), (Py_ssize_t)(sizeof(lit) - 1))

static inline int put_span(out_t *o, const span *s) { return put(o, s->p, s->n); }

/* Decimal digits of v (no sign) at the end of tmp; returns the start. */
static char *utoa_end(unsigned long long v, char *end) {
    char *p = end;
    do {
        *--p = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    return p;
}

static int put_ll(out_t *o, long long x) {
    char tmp[24];
    char *end = tmp + sizeof tmp;
    unsigned long long u = x < 0 ? 0ULL - (unsigned long long)x : (unsigned long long)x;
    char *p = utoa_end(u, end);
    if (x < 0) *--p = '-';
    return put(o, p, end - p);
}

/* A plain int (not bool, not a subclass) in C long long range. */
static int put_int(out_t *o, PyObject *v) {
    if (!PyLong_CheckExact(v)) return 0;
    int overflow = 0;
    long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (overflow || (x == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return 0;
    }
    return put_ll(o, x);
}

/* %.3f of x as Python writes it (correctly rounded, ties to even). The common case (a
 * duration: 0 <= x < 1e6 s in ms, not within 1e-6 of a rounding tie) in integers; anything
 * else through PyOS_double_to_string, Python's own. */
static int put_fixed3(out_t *o, double x) {
    if (x == -1.0) return PUTLIT(o, "-1.000");
    if (x >= 0.0 && x < 1e6 && !signbit(x)) {
        double y = x * 1000.0;
        double fl = (double)(long long)y;
        double frac = y - fl;
        if (frac < 0.5 - 1e-6 || frac > 0.5 + 1e-6) {
            long long n = (long long)fl + (frac > 0.5);
            char tmp[32];
            char *end = tmp + sizeof tmp;
            char *p = end;
            long long frac3 = n % 1000;
            *--p = (char)('0' + frac3 % 10);
            *--p = (char)('0' + frac3 / 10 % 10);
            *--p = (char)('0' + frac3 / 100);
            *--p = '.';
            p = utoa_end((unsigned long long)(n / 1000), p);
            return put(o, p, end - p);
        }
    }
    char *s = PyOS_double_to_string(x, 'f', 3, 0, NULL);
    if (s == NULL) {
        PyErr_Clear();
        return 0;
    }
    int ok = put(o, s, (Py_ssize_t)strlen(s));
    PyMem_Free(s);
    return ok;
}

/* A plain float or int as a double; 0 for anything else (or an int too large). */
static int as_double(PyObject *v, double *x) {
    if (PyFloat_CheckExact(v)) {
        *x = PyFloat_AS_DOUBLE(v);
        return 1;
    }
    if (PyLong_CheckExact(v)) {
        *x = PyLong_AsDouble(v);
        if (*x == -1.0 && PyErr_Occurred()) {
            PyErr_Clear();
            return 0;
        }
        return 1;
    }
    return 0;
}

/* %.3f of a float or an int, as Python's bytes %-formatting writes it. */
static int put_ms(out_t *o, PyObject *v) {
    double x;
    return as_double(v, &x) && put_fixed3(o, x);
}

/* Epoch seconds of a record's time field; 0 when not a plain number in 1970..9999. */
static int time_ok(double x, double *t, long long *sec) {
    if (!(x >= 0.0 && x < 253402300800.0)) return 0;
    *t = x;
    *sec = (long long)x;
    return 1;
}

static int get_time(PyObject *v, double *t, long long *sec) {
    double x;
    return as_double(v, &x) && time_ok(x, t, sec);
}

/* The record's floats (time, queue/connect/first byte/total ms: fields 0 and 14-17) come
 * either as objects in f or, from Sink.http, as doubles in dv (no float objects made). */
#define DV_TIME 0
static int rec_time(PyObject **f, const double *dv, double *t, long long *sec) {
    return dv ? time_ok(dv[DV_TIME], t, sec) : get_time(f[0], t, sec);
}

static inline int put_ms_field(out_t *o, PyObject **f, const double *dv, int i) {
    return dv ? put_fixed3(o, dv[i - 13]) : put_ms(o, f[i]);
}

static PyObject *fallback_call(PyObject *fallback, PyObject *rec) {
    return PyObject_CallOneArg(fallback, rec);
}

static int parse_args(PyObject *const *args, Py_ssize_t nargs, PyObject **fallback,
                      Py_ssize_t *cut, PyObject **rec, const char *name) {
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "%s(fallback, limit, rec): 3 arguments", name);
        return 0;
    }
    *fallback = args[0];
    Py_ssize_t limit = PyLong_AsSsize_t(args[1]);
    if (limit == -1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError)) return 0;
        PyErr_Clear(); /* a huge limit: no cut, as in Python */
        limit = PY_SSIZE_T_MAX;
    }
    /* Python's cut is "limit or no limit": a negative one cuts everything (the Python
     * formatter does it: every record goes there) */
    *cut = limit != 0 ? limit : PY_SSIZE_T_MAX;
    *rec = args[2];
    return 1;
}

/* -------------------------------------------------------------------------------- JSON */

static long long json_sec = -1;
static char json_pre[32];
static Py_ssize_t json_pre_n;

/* A name field as accesslog._jq writes it: "value" (safe characters only here). */
static int put_qname(out_t *o, PyObject *v) {
    span s;
    if (!as_span(v, &s) || !all_in(&s, safe_tab)) return 0;
    return PUTLIT(o, "\"") && put_span(o, &s) && PUTLIT(o, "\"");
}

/* The JSON line of rec into buf; its length, or -1: not the common case (Python's job). */
static Py_ssize_t json_fmt_items(PyObject **f, const double *dv, Py_ssize_t cut, char *buf,
                                 Py_ssize_t cap) {
    double t;
    long long sec;
    if (!rec_time(f, dv, &t, &sec)) return -1;
    /* untrusted strings: ip, method, target, request id, user agent, referer */
    static const int raw_idx[6] = {1, 5, 6, 19, 20, 21};
    span raw[6];
    Py_ssize_t total = 0;
    for (int i = 0; i < 6; i++) {
        if (!as_span(f[raw_idx[i]], &raw[i]) || !all_in(&raw[i], safe_tab))
            return -1;
        total += raw[i].n;
    }
    if (total > cut) return -1;
    if (sec != json_sec) {
        time_t tt = (time_t)sec;
        struct tm tm;
        if (gmtime_r(&tt, &tm) == NULL) return -1;
        json_pre_n = snprintf(json_pre, sizeof json_pre, "%04d-%02d-%02dT%02d:%02d:%02d",
                              tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour,
                              tm.tm_min, tm.tm_sec);
        json_sec = sec;
    }
    out_t o = {buf, buf + cap};
    int msv = (int)((t - (double)sec) * 1000.0);
    char ms[6] = {'.', (char)('0' + msv / 100 % 10), (char)('0' + msv / 10 % 10),
                  (char)('0' + msv % 10), 'Z', 0};
    int msn = 5;
    int ok = PUTLIT(&o, "{\"time\":\"") && put(&o, json_pre, json_pre_n) && put(&o, ms, msn)
        && PUTLIT(&o, "\",\"client_ip\":\"") && put_span(&o, &raw[0])
        && PUTLIT(&o, "\",\"client_port\":") && put_int(&o, f[2])
        && PUTLIT(&o, ",\"listener\":") && put_qname(&o, f[3])
        && PUTLIT(&o, ",\"mode\":") && put_qname(&o, f[4])
        && PUTLIT(&o, ",\"method\":\"") && put_span(&o, &raw[1])
        && PUTLIT(&o, "\",\"target\":\"") && put_span(&o, &raw[2])
        && PUTLIT(&o, "\",\"protocol\":") && put_qname(&o, f[7])
        && PUTLIT(&o, ",\"status\":") && put_int(&o, f[8])
        && PUTLIT(&o, ",\"bytes_in\":") && put_int(&o, f[9])
        && PUTLIT(&o, ",\"bytes_out\":") && put_int(&o, f[10])
        && PUTLIT(&o, ",\"pool\":") && put_qname(&o, f[11])
        && PUTLIT(&o, ",\"backend\":") && put_qname(&o, f[12])
        && PUTLIT(&o, ",\"retries\":") && put_int(&o, f[13])
        && PUTLIT(&o, ",\"queue_ms\":") && put_ms_field(&o, f, dv, 14)
        && PUTLIT(&o, ",\"connect_ms\":") && put_ms_field(&o, f, dv, 15)
        && PUTLIT(&o, ",\"first_byte_ms\":") && put_ms_field(&o, f, dv, 16)
        && PUTLIT(&o, ",\"total_ms\":") && put_ms_field(&o, f, dv, 17)
        && PUTLIT(&o, ",\"termination\":") && put_qname(&o, f[18])
        && PUTLIT(&o, ",\"request_id\":\"") && put_span(&o, &raw[3])
        && PUTLIT(&o, "\",\"user_agent\":\"") && put_span(&o, &raw[4])
        && PUTLIT(&o, "\",\"referer\":\"") && put_span(&o, &raw[5])
        && PUTLIT(&o, "\"}\n");
    return ok ? o.p - buf : -1;
}

/* ---------------------------------------------------------------------------- combined */

static long long clf_sec = -1;
static char clf_when[48];
static Py_ssize_t clf_when_n;
static const char *const MONTHS[12] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                       "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};

/* A field of a combined line: "-" when empty, else the value (checked against tab). */
static int put_dash(out_t *o, const span *s) {
    if (s->n == 0) return PUTLIT(o, "-");
    return put_span(o, s);
}

/* A name field as accesslog._clf_t / _clf_q write it: "-" when empty. */
static int put_name(out_t *o, PyObject *v, const unsigned char *tab) {
    span s;
    if (!as_span(v, &s) || !all_in(&s, tab)) return 0;
    return put_dash(o, &s);
}

/* The combined line of rec into buf; its length, or -1 (Python's job). */
static Py_ssize_t combined_fmt_items(PyObject **f, const double *dv, Py_ssize_t cut,
                                     char *buf, Py_ssize_t cap) {
    double t;
    long long sec;
    if (!rec_time(f, dv, &t, &sec)) return -1;
    span ip, m, tg, rid, ua, rf;
    if (!as_span(f[1], &ip) || !as_span(f[5], &m) || !as_span(f[6], &tg)
        || !as_span(f[19], &rid) || !as_span(f[20], &ua) || !as_span(f[21], &rf))
        return -1;
    /* the Python formatter's cut: the quoted fields as written ("-" for empty) + request id */
    Py_ssize_t quoted = m.n + (tg.n ? tg.n : 1) + (ua.n ? ua.n : 1) + (rf.n ? rf.n : 1);
    if (quoted + (rid.n ? rid.n : 1) > cut) return -1;
    if (!all_in(&ip, tok_tab) || !all_in(&rid, tok_tab) || !all_in(&m, safe_tab)
        || !all_in(&tg, safe_tab) || !all_in(&ua, safe_tab) || !all_in(&rf, safe_tab))
        return -1;
    if (sec != clf_sec) {
        time_t tt = (time_t)sec;
        struct tm tm;
        if (localtime_r(&tt, &tm) == NULL) return -1;
        long off = tm.tm_gmtoff;
        /* Python's tm_gmtoff // 60: floor division */
        off = off >= 0 ? off / 60 : -((-off + 59) / 60);
        char sign = off < 0 ? '-' : '+';
        if (off < 0) off = -off;
        clf_when_n = snprintf(clf_when, sizeof clf_when, "%02d/%s/%04d:%02d:%02d:%02d %c%02ld%02ld",
                              tm.tm_mday, MONTHS[tm.tm_mon], tm.tm_year + 1900, tm.tm_hour,
                              tm.tm_min, tm.tm_sec, sign, off / 60, off % 60);
        clf_sec = sec;
    }
    out_t o = {buf, buf + cap};
    int is_http = m.n > 0;
    int ok = put_dash(&o, &ip) && PUTLIT(&o, " - - [") && put(&o, clf_when, clf_when_n)
        && PUTLIT(&o, "] \"");
    if (ok && is_http) {
        ok = put_span(&o, &m) && PUTLIT(&o, " ") && put_dash(&o, &tg) && PUTLIT(&o, " ")
            && put_name(&o, f[7], safe_tab) && PUTLIT(&o, "\" ");
    } else if (ok) {
        ok = PUTLIT(&o, "-\" ");
    }
    ok = ok && put_int(&o, f[8]) && PUTLIT(&o, " ");
    if (ok) {
        /* bytes out: "-" when 0 (Apache) */
        PyObject *nout = f[10];
        int zero = PyLong_CheckExact(nout) && PyLong_AsLongLong(nout) == 0;
        if (PyErr_Occurred()) PyErr_Clear(); /* too large: put_int falls back */
        ok = zero ? PUTLIT(&o, "-") : put_int(&o, nout);
    }
    ok = ok && PUTLIT(&o, " \"") && put_dash(&o, &rf) && PUTLIT(&o, "\" \"")
        && put_dash(&o, &ua) && PUTLIT(&o, "\" ")
        && put_name(&o, f[3], tok_tab) && PUTLIT(&o, " ")
        && put_name(&o, f[11], tok_tab) && PUTLIT(&o, " ")
        && put_name(&o, f[12], tok_tab) && PUTLIT(&o, " ")
        && put_int(&o, f[13]) && PUTLIT(&o, " ")
        && put_ms_field(&o, f, dv, 14) && PUTLIT(&o, " ") && put_ms_field(&o, f, dv, 15)
        && PUTLIT(&o, " ") && put_ms_field(&o, f, dv, 16) && PUTLIT(&o, " ")
        && put_ms_field(&o, f, dv, 17) && PUTLIT(&o, " ")
        && put_name(&o, f[18], tok_tab) && PUTLIT(&o, " ")
        && put_dash(&o, &rid) && PUTLIT(&o, " ")
        && put_int(&o, f[9]) && PUTLIT(&o, " ") && put_int(&o, f[2]) && PUTLIT(&o, "\n");
    return ok ? o.p - buf : -1;
}

typedef Py_ssize_t (*fmt_items_fn)(PyObject **, const double *, Py_ssize_t, char *,
                                   Py_ssize_t);

/* json_line / combined_line: one record's line, Python's formatter for any other record. */
static PyObject *one_line(PyObject *const *args, Py_ssize_t nargs, fmt_items_fn fn,
                          const char *name) {
    PyObject *fallback, *rec;
    Py_ssize_t cut;
    if (!parse_args(args, nargs, &fallback, &cut, &rec, name)) return NULL;
    if (!PyTuple_CheckExact(rec) || PyTuple_GET_SIZE(rec) != NFIELDS)
        return fallback_call(fallback, rec);
    char buf[LINE_MAX_FAST];
    Py_ssize_t n = fn(((PyTupleObject *)rec)->ob_item, NULL, cut, buf, sizeof buf);
    if (n < 0) return fallback_call(fallback, rec);
    return PyBytes_FromStringAndSize(buf, n);
}

static PyObject *json_line(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    return one_line(args, nargs, json_fmt_items, "json_line");
}

static PyObject *combined_line(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    return one_line(args, nargs, combined_fmt_items, "combined_line");
}

/* -------------------------------------------------------------------------------- Sink */

#define PIPE_ATOMIC 4096

/* An access log's loop-side buffer: add(rec) formats the record (C for the common case,
 * fallback(rec) otherwise) and appends its line, in one call from the hot path. The buffer
 * is reused across hand-overs (take()), so it stays warm in the cache. add() returns 0,
 * or 1 when Python has something to do (first line of a batch: arm the timer; hand-over
 * size reached), or 2 when the line would take the buffer past `room` (not appended:
 * Python refreshes room and tries again, or drops it). */
typedef struct {
    PyObject_HEAD
    char *buf;
    Py_ssize_t len, cap;
    Py_ssize_t nlines;
    Py_ssize_t room;
    Py_ssize_t handover_at;
    Py_ssize_t cut;
    int json;
    int chunked;
    PyObject *fallback;
    PyObject *stream_fallback;
    PyObject *http_fallback;
} Sink;

static int Sink_init(Sink *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"fmt", "limit", "fallback", "stream_fallback", "http_fallback",
                             NULL};
    const char *fmt;
    Py_ssize_t limit;
    PyObject *fb, *sfb, *hfb;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "snOOO", kwlist, &fmt, &limit, &fb, &sfb, &hfb))
        return -1;
    if (strcmp(fmt, "json") != 0 && strcmp(fmt, "combined") != 0) {
        PyErr_SetString(PyExc_ValueError, "fmt: json or combined");
        return -1;
    }
    self->json = fmt[0] == 'j';
    self->cut = limit != 0 ? limit : PY_SSIZE_T_MAX;
    Py_INCREF(fb);
    Py_XSETREF(self->fallback, fb);
    Py_INCREF(sfb);
    Py_XSETREF(self->stream_fallback, sfb);
    Py_INCREF(hfb);
    Py_XSETREF(self->http_fallback, hfb);
    self->room = PY_SSIZE_T_MAX;
    self->handover_at = 64 * 1024;
    return 0;
}

static void Sink_dealloc(Sink *self) {
    PyMem_Free(self->buf);
    Py_XDECREF(self->fallback);
    Py_XDECREF(self->stream_fallback);
    Py_XDECREF(self->http_fallback);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Room for n more bytes after len (the buffer grows by doubling). */
static int sink_reserve(Sink *self, Py_ssize_t n) {
    if (self->len + n > self->cap) {
        Py_ssize_t cap = self->cap ? self->cap : 64 * 1024;
        while (cap < self->len + n) cap *= 2;
        char *nb = PyMem_Realloc(self->buf, (size_t)cap);
        if (nb == NULL) {
            PyErr_NoMemory();
            return 0;
        }
        self->buf = nb;
        self->cap = cap;
    }
    return 1;
}

static int sink_append(Sink *self, const char *p, Py_ssize_t n) {
    if (!sink_reserve(self, n)) return 0;
    memcpy(self->buf + self->len, p, (size_t)n);
    self->len += n;
    self->nlines++;
    return 1;
}

/* The record as a tuple: f's objects, or (dv given) floats made from dv for fields 0 and
 * 14-17 (f holds NULL there). */
static PyObject *tuple_of(PyObject **f, const double *dv) {
    PyObject *t = PyTuple_New(NFIELDS);
    if (t == NULL) return NULL;
    for (int i = 0; i < NFIELDS; i++) {
        PyObject *v;
        if (dv != NULL && (i == 0 || (i >= 14 && i <= 17))) {
            v = PyFloat_FromDouble(dv[i == 0 ? DV_TIME : i - 13]);
            if (v == NULL) {
                Py_DECREF(t);
                return NULL;
            }
        } else {
            v = Py_NewRef(f[i]);
        }
        PyTuple_SET_ITEM(t, i, v);
    }
    return t;
}

static PyObject *call_bytes(PyObject *fn, PyObject *rec) {
    PyObject *line = PyObject_CallOneArg(fn, rec);
    if (line != NULL && !PyBytes_Check(line)) {
        Py_DECREF(line);
        PyErr_SetString(PyExc_TypeError, "access log fallback: not bytes");
        return NULL;
    }
    return line;
}

/* Format a record into the sink: its fields f (22, borrowed; with dv, see tuple_of) or
 * NULL, and *recp the same as a tuple or NULL (then made from f when Python's formatter
 * needs it; the caller owns it). Returns 0 or 1 as add() does, 2 (no room, not appended),
 * -1 (an exception). */
static int sink_put(Sink *self, PyObject **f, const double *dv, PyObject **recp) {
    if (self->fallback == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Sink not initialised");
        return -1;
    }
    Py_ssize_t n = -1;
    if (f != NULL) {
        /* formatted in place, after the buffer's last line: kept only if it fits room */
        if (!sink_reserve(self, LINE_MAX_FAST)) return -1;
        char *at = self->buf + self->len;
        n = self->json ? json_fmt_items(f, dv, self->cut, at, LINE_MAX_FAST)
                       : combined_fmt_items(f, dv, self->cut, at, LINE_MAX_FAST);
        if (n >= 0 && !(n > PIPE_ATOMIC && self->chunked)) {
            if (self->len + n > self->room) return 2;
            self->len += n;
            self->nlines++;
            return self->nlines == 1 || self->len >= self->handover_at;
        }
    }
    if (*recp == NULL && (*recp = tuple_of(f, dv)) == NULL) return -1;
    /* Python's formatter; on a pipe a line over PIPE_BUF is cut shorter (atomic write) */
    PyObject *line = call_bytes(n < 0 ? self->fallback : self->stream_fallback, *recp);
    if (line == NULL) return -1;
    if (self->chunked && PyBytes_GET_SIZE(line) > PIPE_ATOMIC && n < 0) {
        Py_DECREF(line);
        line = call_bytes(self->stream_fallback, *recp);
        if (line == NULL) return -1;
    }
    const char *src = PyBytes_AS_STRING(line);
    n = PyBytes_GET_SIZE(line);
    if (self->len + n > self->room) {
        Py_DECREF(line);
        return 2;
    }
    int ok = sink_append(self, src, n);
    Py_DECREF(line);
    if (!ok) return -1;
    return self->nlines == 1 || self->len >= self->handover_at;
}

static PyObject *Sink_add(Sink *self, PyObject *rec) {
    PyObject **f = NULL;
    if (PyTuple_CheckExact(rec) && PyTuple_GET_SIZE(rec) == NFIELDS)
        f = ((PyTupleObject *)rec)->ob_item;
    PyObject *r = rec;
    int code = sink_put(self, f, NULL, &r);
    if (code < 0) return NULL;
    return PyLong_FromLong(code);
}

static PyObject *str_http, *str_http10, *str_http11;

/* Sink.http(wall_now, ip, port, listener, method, target, http10, status, bytes_in,
 * bytes_out, pool, backend, retries, t0, t_pick, connect_s, t_sent, t_first, now, term,
 * request_id, user_agent, referer): an HTTP request's record from its raw facts, computed
 * as PySink.http does in Python (same float operations), formatted into the sink with no
 * tuple and no float object made (wall_now None: the wall clock, read here). Returns 0 or 1 as add() does, or the record (a tuple) when it found no room
 * (the caller refreshes room and add()s it, or drops it). */
static PyObject *Sink_http(Sink *self, PyObject *const *a, Py_ssize_t nargs) {
    if (nargs != 23) {
        PyErr_SetString(PyExc_TypeError, "Sink.http: 23 arguments");
        return NULL;
    }
    if (self->http_fallback == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Sink not initialised");
        return NULL;
    }
    double d[7];
    static const int fi[7] = {0, 13, 14, 15, 16, 17, 18};
    for (int i = 0; i < 7; i++) {
        PyObject *v = a[fi[i]];
        if (PyFloat_CheckExact(v)) {
            d[i] = PyFloat_AS_DOUBLE(v);
        } else if (i == 0 && v == Py_None) {
            /* the wall clock now, as time.time() reads it */
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            d[0] = (double)ts.tv_sec + ts.tv_nsec * 1e-9;
        } else {
            /* not the proxy's plain floats: Python builds the record */
            PyObject *rec = PyObject_Vectorcall(self->http_fallback, a, (size_t)nargs, NULL);
            if (rec == NULL) return NULL;
            PyObject *r = rec;
            int code = sink_put(self, NULL, NULL, &r);
            if (code == 2) return rec;
            Py_DECREF(rec);
            if (code < 0) return NULL;
            return PyLong_FromLong(code);
        }
    }
    double wall_now = d[0], t0 = d[1], t_pick = d[2], c_s = d[3], t_sent = d[4];
    double t_first = d[5], now = d[6];
    double total = now - t0;
    int http10 = PyObject_IsTrue(a[6]);
    if (http10 < 0) return NULL;
    double dv[5] = {
        wall_now - total,
        t_pick >= 0 ? (t_pick - t0) * 1000.0 : -1.0,
        c_s >= 0 ? c_s * 1000.0 : -1.0,
        t_first >= 0 && t_sent >= 0 ? (t_first - t_sent) * 1000.0 : -1.0,
        total * 1000.0,
    };
    PyObject *f[NFIELDS] = {
        NULL, a[1], a[2], a[3], str_http, a[4], a[5], http10 ? str_http10 : str_http11,
        a[7], a[8], a[9], a[10], a[11], a[12], NULL, NULL, NULL, NULL, a[19], a[20],
        a[21], a[22],
    };
    PyObject *rec = NULL;
    int code = sink_put(self, f, dv, &rec);
    if (code == 2) {
        if (rec == NULL) rec = tuple_of(f, dv);
        return rec; /* NULL with an exception if tuple_of failed */
    }
    Py_XDECREF(rec);
    if (code < 0) return NULL;
    return PyLong_FromLong(code);
}

static PyObject *Sink_take(Sink *self, PyObject *unused) {
    PyObject *data = PyBytes_FromStringAndSize(self->buf ? self->buf : "", self->len);
    if (data == NULL) return NULL;
    PyObject *res = Py_BuildValue("(Nn)", data, self->nlines);
    if (res == NULL) return NULL;
    self->len = 0;
    self->nlines = 0;
    if (self->cap / 4 > self->handover_at && self->cap > 256 * 1024) {
        /* a burst grew it: give the memory back */
        PyMem_Free(self->buf);
        self->buf = NULL;
        self->cap = 0;
    }
    return res;
}

static PyObject *Sink_clear(Sink *self, PyObject *unused) {
    Py_ssize_t n = self->nlines;
    self->len = 0;
    self->nlines = 0;
    return PyLong_FromSsize_t(n);
}

static PyMethodDef Sink_methods[] = {
    {"add", (PyCFunction)Sink_add, METH_O,
     "add(rec) -> 0, 1 (Python has work to do) or 2 (no room: not appended)"},
    {"http", (PyCFunction)(void (*)(void))Sink_http, METH_FASTCALL,
     "http(23 raw facts) -> 0, 1, or the record (no room): see PySink.http"},
    {"take", (PyCFunction)Sink_take, METH_NOARGS,
     "take() -> (bytes, lines): the lines so far; the buffer starts again empty"},
    {"clear", (PyCFunction)Sink_clear, METH_NOARGS, "clear() -> lines thrown away"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Sink_members[] = {
    {"len", T_PYSSIZET, offsetof(Sink, len), READONLY, "bytes buffered"},
    {"nlines", T_PYSSIZET, offsetof(Sink, nlines), READONLY, "lines buffered"},
    {"room", T_PYSSIZET, offsetof(Sink, room), 0, "bytes the buffer may reach"},
    {"handover_at", T_PYSSIZET, offsetof(Sink, handover_at), 0, "add() is True from here"},
    {"chunked", T_INT, offsetof(Sink, chunked), 0, "1: a pipe, lines <= PIPE_BUF"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject SinkType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "lb.data._fastlog.Sink",
    .tp_basicsize = sizeof(Sink),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "An access log's loop-side line buffer (see lb/data/accesslog.py PySink).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Sink_init,
    .tp_dealloc = (destructor)Sink_dealloc,
    .tp_methods = Sink_methods,
    .tp_members = Sink_members,
};

static PyObject *reset(PyObject *mod, PyObject *unused) {
    json_sec = -1;
    clf_sec = -1;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"reset", reset, METH_NOARGS, "reset(): forget the cached time texts (a new time zone)"},
    {"json_line", (PyCFunction)(void (*)(void))json_line, METH_FASTCALL,
     "json_line(fallback, limit, rec) -> bytes: accesslog.json_formatter(limit)(rec)"},
    {"combined_line", (PyCFunction)(void (*)(void))combined_line, METH_FASTCALL,
     "combined_line(fallback, limit, rec) -> bytes: accesslog.combined_formatter(limit)(rec)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {
    PyModuleDef_HEAD_INIT, "_fastlog",
    "Access log lines in C for the common case; lb/data/accesslog.py is the definition.", -1,
    methods,
};

PyMODINIT_FUNC PyInit__fastlog(void) {
    for (int i = 0x20; i < 0x7F; i++) {
        safe_tab[i] = (i != '"' && i != '\\');
        tok_tab[i] = safe_tab[i] && i != ' ';
    }
    if (PyType_Ready(&SinkType) < 0) return NULL;
    str_http = PyUnicode_InternFromString("http");
    str_http10 = PyUnicode_InternFromString("HTTP/1.0");
    str_http11 = PyUnicode_InternFromString("HTTP/1.1");
    if (!str_http || !str_http10 || !str_http11) return NULL;
    PyObject *m = PyModule_Create(&moddef);
    if (m == NULL) return NULL;
    Py_INCREF(&SinkType);
    if (PyModule_AddObject(m, "Sink", (PyObject *)&SinkType) < 0) {
        Py_DECREF(&SinkType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
