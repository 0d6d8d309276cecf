package dev.edgelm.sample

import ai.onnxruntime.genai.Generator
import ai.onnxruntime.genai.GeneratorParams
import ai.onnxruntime.genai.Model
import ai.onnxruntime.genai.Tokenizer
import ai.onnxruntime.genai.TokenizerStream
import dev.edgelm.bundle.BundleManifest

/**
 * An ONNX decoder in ONNX Runtime GenAI (the folder's genai_config.json, written by the export,
 * describes inputs, cache and stop tokens; the tokenizer and sampler are GenAI's). One Generator
 * holds the conversation: each turn's tokens are appended to it, so earlier turns are never
 * prefilled again. GenAI's token loop is the app's only loop, and it is four calls long.
 */
class OrtGenAiChat(folder: String, private val manifest: BundleManifest, maxContext: Int) : ChatEngine {
    private val model = Model(folder)
    private val tokenizer = Tokenizer(model)
    private val stream: TokenizerStream = tokenizer.createStream() // multi-byte characters come out whole
    private val params = GeneratorParams(model).apply {
        setSearchOption("max_length", maxContext.toDouble())
        val sampling = manifest.sampling
        setSearchOption("do_sample", !sampling.greedy())
        if (!sampling.greedy()) {
            setSearchOption("temperature", sampling.temperature)
            setSearchOption("top_p", sampling.topP)
            if (sampling.topK > 0) setSearchOption("top_k", sampling.topK.toDouble())
        }
    }
    private var generator = Generator(model, params)
    private var turns = 0
    @Volatile private var stopped = false

    init {
        require(manifest.chat.available()) { "this bundle's chat template could not be cut into turns: ${manifest.chat.unavailable}" }
    }

    override val label = "ONNX Runtime GenAI (com.microsoft.onnxruntime:onnxruntime-genai-android ${BuildConfig.ORT_GENAI_VERSION})"

    override fun send(user: String, onText: (String) -> Unit) {
        stopped = false
        val chat = manifest.chat
        val text = if (turns == 0) chat.firstTurn(user, manifest.tokenizerAddsBosId != null) else chat.nextTurn(user)
        turns++
        val eos = manifest.eosTokenIds.toSet()
        tokenizer.encode(text).use { generator.appendTokenSequences(it) }
        var produced = 0
        while (!stopped && !generator.isDone() && produced++ < manifest.sampling.maxNewTokens) {
            generator.generateNextToken()
            val token = generator.getLastTokenInSequence(0)
            if (token in eos) {
                // the next turn's text starts with the end-of-turn token: keep it out of the cache once
                generator.rewindTo(generator.tokenCount() - 1)
                break
            }
            onText(stream.decode(token))
        }
    }

    override fun stop() {
        stopped = true
    }

    override fun reset() {
        generator.close()
        generator = Generator(model, params)
        turns = 0
    }

    override fun close() {
        generator.close()
        params.close()
        stream.close()
        tokenizer.close()
        model.close()
    }
}
