"""The training input pipeline: each minibatch is assembled while the step before it runs.

A Prefetcher yields (step, images, labels) for the steps first..last in order, each from the run's own
Data.minibatch (so the minibatches, their order and their bits are exactly those of calling it in the loop). A
background thread assembles up to `depth` minibatches ahead into a bounded queue; numpy's gather and TensorFlow's
Session.run both release the GIL, so the gather overlaps the step. Leaving its `with` block (the loop's end, a
return at a checkpoint, the walltime, a divergence or a signal, an exception) stops and joins the thread; an
exception in the thread is raised in the loop at the step it would have delivered.

Each minibatch is a new array: Session.run may read a fed array in place, so a reused buffer could change a
step's input while it runs. On a GPU the loop also copies each minibatch to the device during the step before
its own (the model's staging area: deepnet_network.make_inputs, Trainer._feeds).
"""
import queue
import threading

DEPTH = 2  # minibatches assembled ahead of the loop
_END = object()


class Prefetcher:
    """(step, images, labels) of fetch(step) for steps first..last, fetched up to `depth` steps ahead in a thread.

    fetch is called from that thread only, in step order. Use it as a context manager: the thread is gone when the
    block is left, however it is left."""

    def __init__(self, fetch, first, last, depth=DEPTH):
        self.fetch, self.queue, self.stopping = fetch, queue.Queue(maxsize=depth), threading.Event()
        self.thread = threading.Thread(target=self._assemble, args=(first, last), name="deepnet-prefetch",
                                       daemon=True)
        self.thread.start()

    def _assemble(self, first, last):
        try:
            for step in range(first, last + 1):
                if self.stopping.is_set():
                    return
                self.queue.put((step, *self.fetch(step)))
            self.queue.put(_END)
        except BaseException as err:  # raised again in the loop's thread
            self.queue.put(err)

    def __iter__(self):
        return self

    def __next__(self):
        item = self.queue.get()
        if item is _END or isinstance(item, BaseException):
            self.queue.put(item)  # a further next() ends the same way instead of waiting
        if item is _END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        """Stop the thread and wait for it (emptying the queue unblocks a put it waits in)."""
        self.stopping.set()
        while self.thread.is_alive():
            try:
                self.queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self.thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
