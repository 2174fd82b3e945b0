"""Scan the built-in digits CNN, plan 80% sparsity, apply it, and compare with a uniform plan."""

import prunescope as ps
from prunescope.digits import batches_of, digits_splits, pretrained_digits_cnn

model = pretrained_digits_cnn()  # trained once (seeded, ~10 s), then cached
splits = digits_splits()
val = ps.Evaluator(model, batches_of(splits.val), metric="accuracy")
profile = ps.scan(model, val, levels=[0.3, 0.5, 0.7, 0.9])  # model is left bit-identical
plan = ps.allocate(profile, ps.Budget(sparsity=0.8), method="threshold")
pruned = ps.apply(model, plan)  # a masked copy; ps.make_permanent(pruned) bakes the zeros in
uniform = ps.apply(model, ps.allocate(profile, 0.8, method="uniform"))
test = ps.Evaluator(model, batches_of(splits.test), metric="accuracy")
print(f"dense {test.dense.value:.3f}  threshold plan {test.evaluate(pruned).value:.3f}  uniform {test.evaluate(uniform).value:.3f}")
