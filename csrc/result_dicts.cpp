// Official result dicts -> the arrays of the flat predictions layout: the fast path of
// prmbench_fast.predictions.parse_results. The Python loop there is the definition; this file does the same walk for
// the results that loop takes as they are (exact dicts and lists, Python bools as labels, Python floats as scores)
// and gives up, returning None, on the first value that loop would convert, pad from a tuple or refuse: the Python
// loop then parses the whole set again and, for a bad value, raises its error naming the sample, field and index.
// Nothing here raises for bad data, so the two paths can only differ in speed (tests/test_result_dicts.py compares
// them).
//
// Python's limited API only (borrowed references from PyList_GetItem / PyDict_GetItemWithError, valid while the
// caller's results are alive, which they are for the whole call).
#include "result_dicts.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

namespace {

// The field names of an official result; the same strings as prmbench_fast/predictions.py.
struct Keys {
  PyObject* idx;
  PyObject* validity;
  PyObject* scores;
  PyObject* validity_labels;
  PyObject* validity_scores;
  PyObject* redundancy_labels;
  PyObject* redundancy_scores;
};

// Interned once for the life of the process (the module is never unloaded); nullptr if Python is out of memory.
const Keys* field_names() {
  static Keys keys{};
  static bool ready = false;
  if (!ready) {
    PyObject** slots[] = {&keys.idx, &keys.validity, &keys.scores, &keys.validity_labels, &keys.validity_scores,
                          &keys.redundancy_labels, &keys.redundancy_scores};
    const char* names[] = {"idx", "validity", "scores", "step_level_validity_labels", "step_level_validity_scores",
                           "step_level_redundancy_labels", "step_level_redundancy_scores"};
    for (int i = 0; i < 7; ++i) {
      if (*slots[i] == nullptr && (*slots[i] = PyUnicode_InternFromString(names[i])) == nullptr) return nullptr;
    }
    ready = true;
  }
  return &keys;
}

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// The lowest and highest score a threshold labelled (ParsedResults.labelled_ranges), in the order Python's min/max
// keep them: a value replaces the current one only when strictly lower / higher.
struct Range {
  bool seen = false;
  double low = std::numeric_limits<double>::infinity();
  double high = -std::numeric_limits<double>::infinity();
  void widen(double v) {
    seen = true;
    if (v < low) low = v;
    if (v > high) high = v;
  }
};

class Flattener {
 public:
  // `unknown` (a list, borrowed) collects the ids outside the dataset.
  Flattener(const Keys& keys, PyObject* position, const char* rule, Py_ssize_t num_samples, double validity_threshold,
            double redundancy_threshold, bool keep_scores, PyObject* unknown)
      : k_(keys), position_(position), unknown_(unknown), rule_(rule), taken_(num_samples, 0),
        num_samples_(num_samples),
        validity_threshold_(validity_threshold), redundancy_threshold_(redundancy_threshold),
        keep_scores_(keep_scores) {
    offsets_.push_back(0);
  }

  // One (sample id, result) pair; false: the Python loop must decide (a Python error raised on the way is cleared).
  bool add(PyObject* sample_id, PyObject* result);

  // The arrays as a tuple (see predictions._parse_compiled), or nullptr with a Python error (out of memory).
  PyObject* arrays() const;

 private:
  // dict[key] as a borrowed reference, nullptr when absent (and when the lookup raised: `ok_` turns false).
  PyObject* lookup(PyObject* dict, PyObject* key) {
    PyObject* value = PyDict_GetItemWithError(dict, key);
    if (value == nullptr && PyErr_Occurred()) {
      PyErr_Clear();
      ok_ = false;
    }
    return value;
  }
  // What `dict.get(key)` is to the Python loop: a None value counts as absent.
  PyObject* get(PyObject* dict, PyObject* key) {
    PyObject* value = lookup(dict, key);
    return value == Py_None ? nullptr : value;
  }
  bool add_redundancy(PyObject* fields, PyObject* labels, PyObject* scores, PyObject** score_source);
  // The first `count` items of `list`, all Python bools.
  static bool append_labels(PyObject* list, Py_ssize_t count, std::vector<uint8_t>& out);
  // The first `count` items of `list`, all Python floats (NaN included: it marks a step without a score).
  static bool append_scores(PyObject* list, Py_ssize_t count, std::vector<double>& out);
  // `score > threshold` for a list of Python floats, none NaN (_threshold_labels).
  static bool append_thresholded(PyObject* list, double threshold, std::vector<uint8_t>& out, Range& range);

  const Keys& k_;
  PyObject* position_;
  PyObject* unknown_;
  const char* rule_;
  std::vector<uint8_t> taken_;
  Py_ssize_t num_samples_;
  double validity_threshold_, redundancy_threshold_;
  bool keep_scores_;
  bool ok_ = true;

  std::vector<int64_t> kept_, offsets_, invalid_;
  std::vector<uint8_t> labels_;
  std::vector<double> scores_;
  std::vector<int64_t> redundancy_rows_, redundancy_lengths_;
  std::vector<uint8_t> redundancy_labels_;
  std::vector<double> redundancy_scores_;
  int64_t duplicates_ = 0;
  Range validity_range_, redundancy_range_;
  bool redundancy_range_first_ = false;  // ranges keep the order in which the thresholds first labelled
};

bool Flattener::append_labels(PyObject* list, Py_ssize_t count, std::vector<uint8_t>& out) {
  for (Py_ssize_t i = 0; i < count; ++i) {
    PyObject* value = PyList_GetItem(list, i);
    if (value == Py_True) {
      out.push_back(1);
    } else if (value == Py_False) {
      out.push_back(0);
    } else {
      return false;
    }
  }
  return true;
}

bool Flattener::append_scores(PyObject* list, Py_ssize_t count, std::vector<double>& out) {
  for (Py_ssize_t i = 0; i < count; ++i) {
    PyObject* value = PyList_GetItem(list, i);
    if (!PyFloat_CheckExact(value)) return false;
    out.push_back(PyFloat_AsDouble(value));
  }
  return true;
}

bool Flattener::append_thresholded(PyObject* list, double threshold, std::vector<uint8_t>& out, Range& range) {
  if (!PyList_CheckExact(list)) return false;
  Py_ssize_t count = PyList_Size(list);
  for (Py_ssize_t i = 0; i < count; ++i) {
    PyObject* value = PyList_GetItem(list, i);
    if (!PyFloat_CheckExact(value)) return false;
    double v = PyFloat_AsDouble(value);
    if (std::isnan(v)) return false;
    range.widen(v);
    out.push_back(v > threshold ? 1 : 0);
  }
  return true;
}

bool Flattener::add(PyObject* sample_id, PyObject* result) {
  PyObject* where_object = lookup(position_, sample_id);
  if (!ok_) return false;
  if (where_object == nullptr) {
    // An id outside the dataset: listed, as the Python loop does.
    return PyList_Append(unknown_, sample_id) == 0 || (PyErr_Clear(), false);
  }
  Py_ssize_t where = PyLong_AsSsize_t(where_object);
  if (where < 0 || where >= num_samples_) {
    PyErr_Clear();
    return false;
  }
  if (taken_[where]) {  // the first result per id wins
    ++duplicates_;
    return true;
  }
  if (!PyDict_CheckExact(result)) return false;
  taken_[where] = 1;
  kept_.push_back(where);

  PyObject* validity = lookup(result, k_.validity);
  if (validity == Py_False) {
    invalid_.push_back(static_cast<int64_t>(kept_.size()) - 1);
    offsets_.push_back(static_cast<int64_t>(labels_.size()));
    return ok_;
  }
  if (validity != nullptr && validity != Py_True) return false;
  PyObject* fields = lookup(result, k_.scores);
  if (fields == nullptr) fields = result;  // a bare scores dict
  if (!PyDict_CheckExact(fields)) return false;
  PyObject* labels = get(fields, k_.validity_labels);
  PyObject* scores = get(fields, k_.validity_scores);

  size_t start = labels_.size();
  PyObject* score_source = nullptr;  // the list whose first n items are this prediction's validity scores
  if (rule_[where] && (lookup(fields, k_.redundancy_labels) != nullptr ||
                       (labels == nullptr && lookup(fields, k_.redundancy_scores) != nullptr))) {
    if (!add_redundancy(fields, labels, scores, &score_source)) return false;
  } else if (labels == nullptr) {
    if (scores == nullptr) return false;
    if (!append_thresholded(scores, validity_threshold_, labels_, validity_range_)) return false;
    score_source = scores;
  } else {
    if (!PyList_CheckExact(labels) || !append_labels(labels, PyList_Size(labels), labels_)) return false;
    if (keep_scores_ && scores != nullptr && !PyList_CheckExact(scores)) return false;
    if (scores != nullptr && PyList_CheckExact(scores) &&
        PyList_Size(scores) == static_cast<Py_ssize_t>(labels_.size() - start)) {
      score_source = scores;
    }
  }
  if (keep_scores_) {
    Py_ssize_t count = static_cast<Py_ssize_t>(labels_.size() - start);
    if (score_source != nullptr) {
      if (!append_scores(score_source, count, scores_)) return false;
    } else {
      scores_.insert(scores_.end(), count, kNaN);  // no scores, or not one per label: unusable for analyses
    }
  }
  offsets_.push_back(static_cast<int64_t>(labels_.size()));
  return ok_;
}

// A `redundency`/`circular` prediction with redundancy values (_redundancy_sample): the redundancy labels (given, or
// thresholded from the scores) are the ones scored; the validity labels are cut or padded with False to their number.
bool Flattener::add_redundancy(PyObject* fields, PyObject* labels, PyObject* scores, PyObject** score_source) {
  PyObject* redundancy_labels = get(fields, k_.redundancy_labels);
  PyObject* redundancy_scores = get(fields, k_.redundancy_scores);
  size_t start = redundancy_labels_.size();
  if (redundancy_labels == nullptr) {
    if (redundancy_scores == nullptr) return false;
    if (!append_thresholded(redundancy_scores, redundancy_threshold_, redundancy_labels_, redundancy_range_)) {
      return false;
    }
    if (redundancy_range_.seen && !validity_range_.seen) redundancy_range_first_ = true;
  } else if (!PyList_CheckExact(redundancy_labels) ||
             !append_labels(redundancy_labels, PyList_Size(redundancy_labels), redundancy_labels_)) {
    return false;
  }
  Py_ssize_t n = static_cast<Py_ssize_t>(redundancy_labels_.size() - start);
  if (redundancy_scores != nullptr && !PyList_CheckExact(redundancy_scores)) return false;
  if (keep_scores_) {
    if (redundancy_scores != nullptr && PyList_Size(redundancy_scores) == n) {
      if (!append_scores(redundancy_scores, n, redundancy_scores_)) return false;
    } else {
      redundancy_scores_.insert(redundancy_scores_.end(), n, kNaN);
    }
  }
  redundancy_rows_.push_back(static_cast<int64_t>(kept_.size()) - 1);
  redundancy_lengths_.push_back(n);

  if (labels != nullptr && PyList_CheckExact(labels) && PyList_Size(labels) == n) {  // the usual case
    if (!append_labels(labels, n, labels_)) return false;
    if (scores != nullptr && PyList_CheckExact(scores) && PyList_Size(scores) == n) *score_source = scores;
    return true;
  }
  if ((labels != nullptr && !PyList_CheckExact(labels)) || (scores != nullptr && !PyList_CheckExact(scores))) {
    return false;  // the Python loop takes tuples here, and ignores other types
  }
  Py_ssize_t given = labels == nullptr ? 0 : PyList_Size(labels);
  if (!append_labels(labels, given < n ? given : n, labels_)) return false;
  labels_.insert(labels_.end(), given < n ? n - given : 0, 0);
  if (scores != nullptr && PyList_Size(scores) >= n) *score_source = scores;
  return true;
}

// A contiguous vector as a bytearray of its items (numpy.frombuffer makes writable arrays of it, which torch.from_numpy
// takes without a copy or a warning).
template <typename T>
PyObject* as_bytearray(const std::vector<T>& values) {
  return PyByteArray_FromStringAndSize(reinterpret_cast<const char*>(values.data()),
                                   static_cast<Py_ssize_t>(values.size() * sizeof(T)));
}

PyObject* range_tuple(const Range& range) { return Py_BuildValue("(dd)", range.low, range.high); }

PyObject* Flattener::arrays() const {
  PyObject* ranges = PyDict_New();
  if (ranges == nullptr) return nullptr;
  const char* names[2] = {"validity_threshold", "redundancy_threshold"};
  const Range* order[2] = {&validity_range_, &redundancy_range_};
  if (redundancy_range_first_) {
    std::swap(names[0], names[1]);
    std::swap(order[0], order[1]);
  }
  for (int i = 0; i < 2; ++i) {
    if (!order[i]->seen) continue;
    PyObject* pair = range_tuple(*order[i]);
    if (pair == nullptr || PyDict_SetItemString(ranges, names[i], pair) < 0) {
      Py_XDECREF(pair);
      Py_DECREF(ranges);
      return nullptr;
    }
    Py_DECREF(pair);
  }
  PyObject* scores = keep_scores_ ? as_bytearray(scores_) : (Py_INCREF(Py_None), Py_None);
  PyObject* redundancy_scores = keep_scores_ ? as_bytearray(redundancy_scores_) : (Py_INCREF(Py_None), Py_None);
  // "N" steals each new reference, also when building the tuple fails.
  return Py_BuildValue("(NNNNNNNNNOLN)", as_bytearray(kept_), as_bytearray(offsets_), as_bytearray(labels_), scores,
                       as_bytearray(invalid_), as_bytearray(redundancy_rows_), as_bytearray(redundancy_lengths_),
                       as_bytearray(redundancy_labels_), redundancy_scores, unknown_,
                       static_cast<long long>(duplicates_), ranges);
}

}  // namespace

extern "C" PyObject* prmbench_fast_flat_from_results(PyObject* /*self*/, PyObject* args) {
  PyObject *ids, *results, *position, *rule;
  double validity_threshold, redundancy_threshold;
  int keep_scores;
  if (!PyArg_ParseTuple(args, "OO!O!O!ddp", &ids, &PyList_Type, &results, &PyDict_Type, &position, &PyBytes_Type,
                        &rule, &validity_threshold, &redundancy_threshold, &keep_scores)) {
    return nullptr;
  }
  const Keys* keys = field_names();
  if (keys == nullptr) return nullptr;
  if (ids != Py_None && (!PyList_CheckExact(ids) || PyList_Size(ids) != PyList_Size(results))) {
    PyErr_SetString(PyExc_ValueError, "flat_from_results: ids must be None or a list as long as results");
    return nullptr;
  }
  PyObject* unknown = PyList_New(0);
  if (unknown == nullptr) return nullptr;
  Flattener flattener(*keys, position, PyBytes_AsString(rule), PyBytes_Size(rule), validity_threshold,
                      redundancy_threshold, keep_scores != 0, unknown);
  for (Py_ssize_t i = 0; i < PyList_Size(results); ++i) {
    // Strong references while a result is walked: a non-str key's Python __eq__, run by a dict lookup, could change
    // the lists (the walk does not try to be correct then, only not to read freed memory through these two).
    PyObject* result = PyList_GetItem(results, i);
    PyObject* sample_id = nullptr;
    if (result != nullptr) {
      Py_INCREF(result);
      if (ids == Py_None) {  // a list of results carrying their ids
        sample_id = PyDict_CheckExact(result) ? PyDict_GetItemWithError(result, keys->idx) : nullptr;
      } else {
        sample_id = PyList_GetItem(ids, i);
      }
      Py_XINCREF(sample_id);
    }
    bool walked = sample_id != nullptr && flattener.add(sample_id, result);
    Py_XDECREF(sample_id);
    Py_XDECREF(result);
    if (!walked) {
      PyErr_Clear();
      Py_DECREF(unknown);
      Py_RETURN_NONE;
    }
  }
  PyObject* arrays = flattener.arrays();
  Py_DECREF(unknown);
  return arrays;
}
