// Plain JVM: manifest parsing, sha256 check, artifact choice with version rules and fallback,
// chat turns, sampling settings. No Android APIs, so CI compiles and tests it with the JDK alone
// (../run_tests.sh). Java 11 bytecode: any JDK from 11 on builds it, no toolchain download.
plugins { `java-library` }

java {
    sourceCompatibility = JavaVersion.VERSION_11
    targetCompatibility = JavaVersion.VERSION_11
}

dependencies {
    implementation("com.google.code.gson:gson:2.10.1")
    testImplementation("junit:junit:4.13.2")
}

tasks.test {
    systemProperty("edgelm.bundle", System.getProperty("edgelm.bundle") ?: "")
    systemProperty("edgelm.runtimes", System.getProperty("edgelm.runtimes") ?: "")
}
