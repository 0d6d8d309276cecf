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

/** edgelm's ONNX decoder: (input_ids, past_key_i, past_value_i, ...) -> (logits, present_*). */
class OnnxDecoder(file: File) : Decoder {
    private val env = OrtEnvironment.getEnvironment()
    private val session = env.createSession(file.path, OrtSession.SessionOptions().apply { setIntraOpNumThreads(4) })
    private val pastNames = session.inputNames.filter { it.startsWith("past_") }
    private var past: Map<String, OnnxTensor> = pastNames.associateWith { name ->
        val shape = (session.inputInfo.getValue(name).info as TensorInfo).shape.copyOf()
        shape[2] = 0 // no cached positions yet
        OnnxTensor.createTensor(env, FloatBuffer.allocate(0), shape)
    }

    override fun prefill(ids: LongArray): FloatArray {
        val input = OnnxTensor.createTensor(env, LongBuffer.wrap(ids), longArrayOf(1, ids.size.toLong()))
        val result = session.run(mapOf("input_ids" to input) + past)
        val logits = result.get(0).value.let { (it as Array<*>)[0] as Array<*> }.last() as FloatArray
        val next = pastNames.associateWith { name ->
            result.get(name.replace("past_", "present_")).get() as OnnxTensor
        }
        past.values.forEach { it.close() }
        past = next
        input.close()
        return logits
    }

    override fun close() {
        past.values.forEach { it.close() }
        session.close()
    }
}

/**
 * edgelm's LiteRT decoder: signatures `prefill` (fixed length, padded) and `decode`, inputs
 * (input_ids, input_pos, cache_key_0, cache_value_0, ...), outputs (logits, new_key_0, ...).
 * The cache lives here; only the new positions come back from each call.
 */
class LiteRtDecoder(file: File) : Decoder {
    private val interpreter = Interpreter(file, Interpreter.Options().setNumThreads(4))
    private val decodeInputs = interpreter.getSignatureInputs("decode").sortedBy { it.removePrefix("args_").toInt() }
    private val cacheShape = interpreter.getInputTensorFromSignature(decodeInputs[2], "decode").shape() // [1, kvh, C, hd]
    private val prefillLength = interpreter.getInputTensorFromSignature("args_0", "prefill").shape()[1]
    private val caches = List(decodeInputs.size - 2) { direct(cacheShape.fold(4) { a, b -> a * b }) }
    private var position = 0

    private fun direct(bytes: Int) = ByteBuffer.allocateDirect(bytes).order(ByteOrder.nativeOrder())

    private fun step(signature: String, ids: LongArray, width: Int): FloatArray {
        val (kvHeads, context, headDim) = Triple(cacheShape[1], cacheShape[2], cacheShape[3])
        require(position + ids.size <= context) { "the model's cache holds $context positions" }
        val inputs = HashMap<String, Any>()
        inputs["args_0"] = arrayOf(IntArray(width) { if (it < ids.size) ids[it].toInt() else 0 })
        inputs["args_1"] = intArrayOf(position)
        caches.forEachIndexed { i, cache -> inputs["args_${i + 2}"] = cache.rewind() }
        val vocab = interpreter.getOutputTensorFromSignature("output_0", signature).shape()[2]
        val logits = direct(4 * width * vocab)
        val news = caches.map { direct(4 * kvHeads * width * headDim) }
        val outputs = HashMap<String, Any>()
        outputs["output_0"] = logits
        news.forEachIndexed { i, buffer -> outputs["output_${i + 1}"] = buffer }
        interpreter.runSignature(inputs, outputs, signature)
        for ((cache, new) in caches.zip(news)) { // write the new positions into the cache, head by head
            val source = new.rewind() as ByteBuffer
            for (head in 0 until kvHeads) for (t in ids.indices) for (d in 0 until headDim) {
                val value = source.getFloat(4 * ((head * width + t) * headDim + d))
                cache.putFloat(4 * ((head * context + position + t) * headDim + d), value)
            }
        }
        position += ids.size
        val all = logits.rewind() as ByteBuffer
        return FloatArray(vocab) { all.getFloat(4 * ((ids.size - 1) * vocab + it)) }
    }

    override fun prefill(ids: LongArray): FloatArray {
        var last = FloatArray(0)
        for (start in ids.indices step prefillLength) {
            last = step("prefill", ids.copyOfRange(start, minOf(ids.size, start + prefillLength)), prefillLength)
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
