"""Plain-Python stages of kdm (no Prefect imports): stores, teachers, pairs, filters, training, evaluation."""
