"""``lamina serve``: Docker's graph driver plugin protocol (``plugin``) over HTTP on a unix
socket (``http``)."""
