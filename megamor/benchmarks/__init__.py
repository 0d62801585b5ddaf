"""Benchmark tools built on every layer below them (decoding: the engine against HF generate, the
paper's decode protocol with the planner's relative maximum batch). Nothing in megamor imports them
except entry points and gpu_check."""
