// The ONE list of optimizers.  X(Struct, python_name) drives the explicit instantiations of the
// driver for every instruction set, the dispatch tables and the Python bindings.
#pragma once

#define FASTOPTIM_OPTIMIZERS(X) \
  X(SGD, sgd)                   \
  X(Adagrad, adagrad)           \
  X(RMSprop, rmsprop)           \
  X(Adadelta, adadelta)         \
  X(Adam, adam)                 \
  X(Adamax, adamax)             \
  X(NAdam, nadam)               \
  X(RAdam, radam)               \
  X(Lion, lion)                 \
  X(Rprop, rprop)               \
  X(ASGD, asgd)                 \
  X(ADOPT, adopt)               \
  X(AdamWScheduleFree, adamwschedulefree) \
  X(SGDScheduleFree, sgdschedulefree) \
  X(SparseAdam, sparseadam)      \
  X(LAMB, lamb)                 \
  X(LARS, lars)

// The optimizers with sparse row updates (fastoptim::step_rows): X(Struct, python_name).
#define FASTOPTIM_ROW_OPTIMIZERS(X) \
  X(SGD, sgd)                       \
  X(Adagrad, adagrad)               \
  X(SparseAdam, sparseadam)
