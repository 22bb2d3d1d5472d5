"""Package data of an installed qbench (see qbench.resources); empty in a source checkout."""
