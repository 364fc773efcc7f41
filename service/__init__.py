"""The service: REST API, job lifecycle, dispatch to Ray, storage and the CLI; never imports torch."""
