"""Run directories: atomic publish, manifests, resume, preemption, lineage, provenance, export."""
