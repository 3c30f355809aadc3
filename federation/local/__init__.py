"""A whole consortium on one machine: `twinfed demo` (real processes on loopback) and `study simulate`
(Flower's simulation engine over real site folders), with the memory sampler they report from."""
