package dev.edgelm.sample

import com.google.ai.edge.litertlm.Backend
import com.google.ai.edge.litertlm.Conversation
import com.google.ai.edge.litertlm.Engine
import com.google.ai.edge.litertlm.EngineConfig
import kotlinx.coroutines.Job
import kotlinx.coroutines.launch
import kotlinx.coroutines.runBlocking

/**
 * A .litertlm (the export packs the .tflite with its tokenizer, chat template and stop tokens)
 * in LiteRT-LM's Engine: the Conversation applies the template and keeps the history itself,
 * so the app sends the user's words only.
 */
class LiteRtLmChat(litertlm: String, cacheDir: String) : ChatEngine {
    private val engine = Engine(EngineConfig(modelPath = litertlm, backend = Backend.CPU, cacheDir = cacheDir))
    private var conversation: Conversation
    @Volatile private var running: Job? = null

    init {
        engine.initialize() // throws when the file or the backend cannot be loaded
        conversation = engine.createConversation()
    }

    override val label = "LiteRT-LM Engine (com.google.ai.edge.litertlm:litertlm-android ${BuildConfig.LITERT_LM_VERSION})"

    override fun send(user: String, onText: (String) -> Unit) = runBlocking {
        val job = launch { conversation.sendMessageAsync(user).collect { message -> onText(message.toString()) } }
        running = job
        try {
            job.join() // returns normally when stop() cancels the collection
        } finally {
            running = null
        }
    }

    override fun stop() {
        running?.cancel() // cancelling the collecting coroutine ends the runtime's generation
    }

    override fun reset() {
        conversation.close()
        conversation = engine.createConversation()
    }

    override fun close() {
        conversation.close()
        engine.close()
    }
}
