"""Planning a training layout before launching it: memory per rank, speed, the layouts that fit."""
