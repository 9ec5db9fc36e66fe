from monitoring.exporter.cli import exporter

exporter(prog_name="enclave exporter")
