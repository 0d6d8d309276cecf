package dev.edgelm.sample

/**
 * One loaded artifact in its vendor's LLM runtime, holding one conversation. The runtime owns
 * the tokenizer, the sampler and the KV cache; the app sends each new turn and streams text.
 * Not thread-safe except [stop], which another thread calls to end a running [send].
 */
interface ChatEngine : AutoCloseable {
    /** The runtime and library in use, for the screen. */
    val label: String

    /**
     * Send the user's next message (the runtime keeps the earlier turns) and stream the answer's
     * text pieces to [onText] as the runtime decodes them. Blocks until the answer ends or [stop].
     */
    fun send(user: String, onText: (String) -> Unit)

    /** End a running [send] early (the stop button). */
    fun stop()

    /** Forget the conversation (a new chat). */
    fun reset()
}
