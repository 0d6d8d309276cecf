package dev.edgelm.sample

import ai.onnxruntime.OnnxTensor
import ai.onnxruntime.OrtEnvironment
import ai.onnxruntime.OrtSession
import ai.onnxruntime.TensorInfo
import java.io.File
import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.nio.FloatBuffer
import java.nio.LongBuffer
import org.pytorch.executorch.EValue
import org.pytorch.executorch.Module
import org.pytorch.executorch.Tensor
import org.tensorflow.lite.Interpreter

/** One KV-cached decoder, as edgelm's runtimes see it: prefill a prompt, then one token at a time. */
interface Decoder : AutoCloseable {
    /** Append ids to the cache; return the logits after the last one. */
    fun prefill(ids: LongArray): FloatArray
    fun decode(id: Long): FloatArray = prefill(longArrayOf(id))
}

/** The runtimes this app is built with, keyed like manifest.json's `runtime` (llama.cpp has no official Maven artifact). */
val AVAILABLE_RUNTIMES = setOf("onnxruntime", "litert", "executorch")

fun openDecoder(runtime: String, file: File): Decoder = when (runtime) {
    "onnxruntime" -> OnnxDecoder(file)
    "litert" -> LiteRtDecoder(file)
    "executorch" -> ExecuTorchDecoder(file)
    else -> throw IllegalArgumentException("this app has no $runtime runtime")
}

/**
 * edgelm's ONNX decoder: (input_ids, attention_mask, past_key_i, past_value_i, ...) -> (logits, present_*),
 * attention through onnxruntime's GroupQueryAttention; presents are past + new, positions come from the mask.
 */
class OnnxDecoder(file: File) : Decoder {
    private val env = OrtEnvironment.getEnvironment()
    private val session = env.createSession(file.path, OrtSession.SessionOptions().apply { setIntraOpNumThreads(4) })
    private val pastNames = session.inputNames.filter { it.startsWith("past_") }
    private val takesMask = "attention_mask" in session.inputNames
    private var length = 0L
    private var past: Map<String, OnnxTensor> = pastNames.associateWith { name ->
        val shape = (session.inputInfo.getValue(name).info as TensorInfo).shape.copyOf()
        shape[2] = 0 // no cached positions yet
        OnnxTensor.createTensor(env, FloatBuffer.allocate(0), shape)
    }

    override fun prefill(ids: LongArray): FloatArray {
        val input = OnnxTensor.createTensor(env, LongBuffer.wrap(ids), longArrayOf(1, ids.size.toLong()))
        val total = length + ids.size
        val mask = OnnxTensor.createTensor(env, LongBuffer.wrap(LongArray(total.toInt()) { 1L }), longArrayOf(1, total))
        val feeds = mapOf("input_ids" to input) + (if (takesMask) mapOf("attention_mask" to mask) else emptyMap()) + past
        val result = session.run(feeds)
        val logits = result.get(0).value.let { (it as Array<*>)[0] as Array<*> }.last() as FloatArray
        val next = pastNames.associateWith { name ->
            result.get(name.replace("past_", "present_")).get() as OnnxTensor
        }
        past.values.forEach { it.close() }
        past = next
        length = total
        input.close()
        mask.close()
        return logits
    }

    override fun close() {
        past.values.forEach { it.close() }
        session.close()
    }
}

/**
 * edgelm's LiteRT decoder, in LiteRT-LM's layout: signatures `prefill` (fixed length, padded) and
 * `decode`, inputs `tokens`, `input_pos`, `kv_cache_k_<i>`/`kv_cache_v_<i>`, outputs `logits` and the
 * updated caches under the same names. The same buffer goes in and comes back for each cache. (An app
 * that wants LiteRT-LM's own engine loads the bundle's `.litertlm` beside this file instead.)
 */
class LiteRtDecoder(file: File) : Decoder {
    private val interpreter = Interpreter(file, Interpreter.Options().setNumThreads(4))
    private val cacheNames = interpreter.getSignatureInputs("decode").filter { it.startsWith("kv_cache_") }
    private val cacheShape = interpreter.getInputTensorFromSignature(cacheNames[0], "decode").shape() // [1, kvh, C, hd]
    private val prefillLength = interpreter.getInputTensorFromSignature("tokens", "prefill").shape()[1]
    private val caches = cacheNames.associateWith { direct(cacheShape.fold(4) { a, b -> a * b }) }
    private var position = 0

    private fun direct(bytes: Int) = ByteBuffer.allocateDirect(bytes).order(ByteOrder.nativeOrder())

    private fun step(signature: String, ids: LongArray, width: Int): FloatArray {
        val context = cacheShape[2]
        require(position + ids.size <= context) { "the model's cache holds $context positions" }
        val inputs = HashMap<String, Any>()
        inputs["tokens"] = arrayOf(IntArray(width) { if (it < ids.size) ids[it].toInt() else 0 })
        inputs["input_pos"] = IntArray(width) { if (it < ids.size) position + it else 0 }
        caches.forEach { (name, cache) -> inputs[name] = cache.rewind() }
        val vocab = interpreter.getOutputTensorFromSignature("logits", signature).shape()[2]
        val logits = direct(4 * width * vocab)
        val outputs = HashMap<String, Any>()
        outputs["logits"] = logits
        caches.forEach { (name, cache) -> outputs[name] = cache.rewind() }
        interpreter.runSignature(inputs, outputs, signature)
        position += ids.size
        val all = logits.rewind() as ByteBuffer
        return FloatArray(vocab) { all.getFloat(4 * ((ids.size - 1) * vocab + it)) }
    }

    override fun prefill(ids: LongArray): FloatArray {
        var last = FloatArray(0)
        var start = 0
        while (start < ids.size) { // a padded chunk that would run past the cache's end goes token by token
            if (position + prefillLength <= cacheShape[2]) {
                val end = minOf(ids.size, start + prefillLength)
                last = step("prefill", ids.copyOfRange(start, end), prefillLength)
                start = end
            } else {
                last = decode(ids[start])
                start += 1
            }
        }
        return last
    }

    override fun decode(id: Long): FloatArray = step("decode", longArrayOf(id), 1)

    override fun close() = interpreter.close()
}

/** edgelm's ExecuTorch program: forward(input_ids[1, n], input_pos[1]) -> logits, cache inside the program. */
class ExecuTorchDecoder(file: File) : Decoder {
    private val module = Module.load(file.path)
    private var position = 0L

    override fun prefill(ids: LongArray): FloatArray {
        val out = module.forward(
            EValue.from(Tensor.fromBlob(ids, longArrayOf(1, ids.size.toLong()))),
            EValue.from(Tensor.fromBlob(longArrayOf(position), longArrayOf(1))),
        )[0].toTensor()
        position += ids.size
        val all = out.dataAsFloatArray
        val vocab = all.size / ids.size
        return all.copyOfRange(all.size - vocab, all.size)
    }

    override fun close() = module.destroy()
}
