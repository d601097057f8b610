"""The run directory and what keeps it honest: its life from `<name>.partial` to a finished name
(lifecycle), the manifest of inputs, tools, hardware and artifact hashes (manifest), and the
content-addressed cache of build intermediates shared between runs (cache)."""
