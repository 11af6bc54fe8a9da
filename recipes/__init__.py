"""Training recipes: declarative YAML files run with `hybridzoo train`, on one process or many with accelerate."""
