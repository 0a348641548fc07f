# Included after each project() of llama.cpp (CMAKE_PROJECT_INCLUDE) by Kiln's llamacpp.build.
include_guard(GLOBAL)

# Every target: __FILE__ (in GGML_ASSERT's messages) relative to the tree. Without it the binaries
# hold the tree's absolute path in the store wherever a source is compiled by absolute path (the
# unity batches of llama's models, and every file when ccache is absent), so their bytes would
# depend on where the store is and the bundle would carry the build machine's paths.
add_compile_options("-ffile-prefix-map=${CMAKE_SOURCE_DIR}/=")

# Once the top-level folder is processed and every target exists, the targets named in
# KILN_UNITY_TARGETS become unity builds: their sources compile KILN_UNITY_BATCH at a time, so the
# headers they all include (nlohmann/json, the chat and PEG parsers) are parsed once per batch
# instead of once per file. Sources in KILN_UNITY_SKIP (relative to the target's folder) compile
# alone: they specialize templates another file of the batch has already instantiated.
function(kiln_unity_build)
  foreach(target IN LISTS KILN_UNITY_TARGETS)
    if(NOT TARGET "${target}")
      message(FATAL_ERROR "Kiln unity build: this llama.cpp tree has no target '${target}' "
                          "(stages.llamacpp.build.unity_targets)")
    endif()
    get_target_property(folder "${target}" SOURCE_DIR)
    set_target_properties("${target}" PROPERTIES UNITY_BUILD ON UNITY_BUILD_BATCH_SIZE "${KILN_UNITY_BATCH}")
    foreach(source IN LISTS KILN_UNITY_SKIP)
      if(EXISTS "${folder}/${source}")
        set_source_files_properties("${folder}/${source}" TARGET_DIRECTORY "${target}"
                                    PROPERTIES SKIP_UNITY_BUILD_INCLUSION ON)
      endif()
    endforeach()
  endforeach()
endfunction()

cmake_language(DEFER DIRECTORY "${CMAKE_SOURCE_DIR}" CALL kiln_unity_build)
