"""Background drains: the worker shape, the disk drain (memory -> disk), the upload (-> object
store), retention (automatic and by hand) and operator pins. Each drain is a Worker that its
owner starts and awaits on shutdown."""
