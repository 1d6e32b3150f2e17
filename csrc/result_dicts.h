// Official result dicts -> the arrays of the flat predictions layout, in C: the fast path of
// prmbench_fast.predictions.parse_results for well-formed results. Written against Python's limited API (see ops.cpp).
#pragma once

#include <Python.h>

extern "C" {
// _C.flat_from_results(ids, results, position, redundancy_rule, validity_threshold, redundancy_threshold,
// keep_scores): the arrays parse_results' Python loop would build, or None where that loop must decide (any value it
// would convert, pad differently or refuse). The Python docstring of predictions._parse_compiled gives the layout.
PyObject* prmbench_fast_flat_from_results(PyObject* self, PyObject* args);
}
