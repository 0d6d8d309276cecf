"""Exporters, one module per format. The registry is edgelm.exporter.EXPORTER_MODULES."""
