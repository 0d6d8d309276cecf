package dev.edgelm.sample

import dev.edgelm.bundle.BundleManifest
import dev.edgelm.bundle.ChatTurns
import org.pytorch.executorch.extension.llm.LlmCallback
import org.pytorch.executorch.extension.llm.LlmModule

/**
 * A .pte in ExecuTorch's LlmModule (the LLM runner: its own tokenizer from tokenizer.json,
 * sampler, and the static KV cache inside the program, which persists between generate()
 * calls until resetContext()). The runner takes raw text, so the chat template comes from the
 * manifest's turn strings; the program's own get_eos_ids method tells the runner where to stop.
 */
class ExecuTorchChat(pte: String, tokenizerJson: String, private val manifest: BundleManifest, private val maxContext: Int) :
    ChatEngine {
    private val chat: ChatTurns = manifest.chat
    private val module = LlmModule(pte, tokenizerJson, manifest.sampling.temperature.toFloat())
    private var turns = 0

    init {
        require(chat.available()) { "ExecuTorch takes raw text and this bundle's chat template could not be cut into turns: ${chat.unavailable}" }
        module.load() // throws ExecutorchRuntimeException when the program or its kernels do not load
    }

    override val label = "ExecuTorch LlmModule (org.pytorch:executorch-android ${BuildConfig.EXECUTORCH_VERSION})"

    override fun send(user: String, onText: (String) -> Unit) {
        // numBos = 0: the template's text already holds any BOS (unless the tokenizer adds it itself)
        val text = if (turns == 0) chat.firstTurn(user, manifest.tokenizerAddsBosId != null) else chat.nextTurn(user)
        turns++
        val callback = object : LlmCallback {
            override fun onResult(result: String) = onText(result)
        }
        module.generate(text, maxContext, callback, false, manifest.sampling.temperature.toFloat(), 0, 0)
    }

    override fun stop() = module.stop()

    override fun reset() {
        module.resetContext()
        turns = 0
    }

    override fun close() = module.close()
}
