"""One module per kind of model: its data, its loss, its validation and its test evaluation."""
