plugins {
    id("com.android.application")
    id("org.jetbrains.kotlin.android")
}

android {
    namespace = "dev.edgelm.sample"
    compileSdk = 35
    defaultConfig {
        applicationId = "dev.edgelm.sample"
        minSdk = 26
        targetSdk = 35
        versionCode = 1
        versionName = "0.1.0"
        ndk { abiFilters += "arm64-v8a" } // what `edgelm export --target android` builds for
    }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions { jvmTarget = "17" }
}

dependencies {
    implementation(project(":bundle"))
    implementation("com.google.code.gson:gson:2.10.1")
    // One official Android library per runtime edgelm exports for.
    implementation("com.microsoft.onnxruntime:onnxruntime-android:1.22.0")
    implementation("org.pytorch:executorch-android:0.7.0")
    implementation("com.google.ai.edge.litert:litert:1.4.0")
    // Tokenization: Hugging Face tokenizer.json, the file every edgelm bundle ships.
    implementation("ai.djl.huggingface:tokenizers:0.33.0")
    implementation("org.jetbrains.kotlinx:kotlinx-coroutines-android:1.9.0")
}
